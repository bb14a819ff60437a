"""ONNX export of the full-size H-Deformable-DETR, checked and timed against PyTorch.

    python benchmarks/export_onnx.py                      # a chess photo from ../shared/data
    python benchmarks/export_onnx.py --image photo.jpg --repeats 5

recipes/hdetr.yaml's architecture (ResNet-50, two-stage, box refinement, mixed query selection,
300 one-to-one queries) with 12 classes and seeded random weights is saved as a dfx checkpoint,
exported by ``dfx.export.export`` at 800x800 (the image resized to fit and padded, ``mask`` marking
the padding) and checked with onnxruntime. Then PyTorch and onnxruntime run the same input in turn
(``--repeats`` times after one warm-up each); the medians are printed with the export's numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfx.engine.checkpoint import save_weights  # noqa: E402
from dfx.engine.trainer import checkpoint_metadata  # noqa: E402
from dfx.export import DetectionGraph, example_inputs, export, require_onnx  # noqa: E402
from dfx.models import build  # noqa: E402

CHESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chess-pieces-coco" / "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None, help="default: the first chess test photo")
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    photos = sorted(CHESS.glob("*.jpg"))
    if args.image is None and not photos:
        parser.error(f"no photos in {CHESS}; pass --image FILE")
    image = args.image or photos[0]
    _, onnxruntime = require_onnx()
    torch.manual_seed(0)
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "hdetr.yaml"
    recipe, task, model, _ = build(recipe_path, ["model.pretrained=null", "model.num_classes=12"])
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "hdetr.safetensors"
        save_weights(weights, model.state_dict(), checkpoint_metadata(recipe, task, 0, {}))
        result = export(weights, image=image, image_size=[args.size], out=Path(folder) / "hdetr.onnx")
        names, inputs, _ = example_inputs(recipe, (args.size, args.size), image)
        session = onnxruntime.InferenceSession(result["file"], providers=["CPUExecutionProvider"])
        feed = {n: t.numpy() for n, t in zip(names, inputs)}
        graph = DetectionGraph(model).eval()
        runs = {"pytorch": lambda: graph(*inputs), "onnxruntime": lambda: session.run(None, feed)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for run in runs.values():
                run()  # warm-up
            for _ in range(args.repeats):  # in turn, so load on the machine hits both alike
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    summary = {"image": str(image), "size": args.size, "export_s": result["export_s"], "size_mb": result["size_mb"],
               "max_abs_diff": result["check"]["per_output"], "threads": torch.get_num_threads(),
               **{f"{name}_s": round(statistics.median(t), 2) for name, t in times.items()}}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
