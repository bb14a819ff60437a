"""Per-photo latency of a trained detector: PyTorch (what ``dfx predict`` runs) and its ONNX export
through onnxruntime, side by side on the same photos and threads.

    python benchmarks/predict_latency.py runs/detection/finetune-small-det --onnx model.onnx
    python benchmarks/predict_latency.py RUN --photos ../shared/data/chess-pieces-coco/test --count 10

For every photo, in turn (so that load on the machine hits both alike): read and preprocess it as
``dfx predict`` does (decode, shorter side ``max(data.scales)``, normalise), then
- pytorch: the model on the unpadded image, then top-k post-processing (``dfx predict``'s path);
- onnxruntime: the exported graph on the image padded into the file's fixed canvas (its ``mask``
  marks the padding, :func:`dfx.export.example_inputs`), then the same post-processing.
Medians over the photos (after one warm-up each) are printed as JSON: per photo (``*_photo``: read
to detections) and the network alone (``*_model``), the read/preprocess time on its own, and the
largest score difference between the two among each photo's top 10 detections.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfx.data.det_transforms import DetectionTransform  # noqa: E402
from dfx.detection import postprocess  # noqa: E402
from dfx.export import example_inputs, require_onnx  # noqa: E402
from dfx.models import build  # noqa: E402
from dfx.predict import read_image  # noqa: E402

DATA = Path(os.environ.get("DFX_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
CHESS = DATA / "chess-pieces-coco" / "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="a run directory or dfx checkpoint of a detector")
    parser.add_argument("--onnx", type=Path, required=True, help="its export (dfx export WEIGHTS --image-size H W)")
    parser.add_argument("--photos", type=Path, default=CHESS)
    parser.add_argument("--count", type=int, default=10, help="photos timed (the first, sorted by name)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.count]
    if not photos:
        parser.error(f"no photos in {args.photos}")
    _, onnxruntime = require_onnx()
    torch.set_num_threads(args.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = onnxruntime.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    canvas = tuple(session.get_inputs()[0].shape[-2:])
    recipe, _, model, _ = build(args.weights)
    data = recipe.data
    transform = DetectionTransform(False, scales=data.scales, max_size=data.max_size, mean=data.mean, std=data.std)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    keep = recipe.model.detections

    def read(photo):
        image = read_image(photo)
        tensor, _ = transform(image, empty)
        return image, tensor

    def pytorch(image, tensor):
        outputs = model(tensor[None], torch.zeros(1, *tensor.shape[1:], dtype=torch.bool))
        return postprocess(outputs, torch.tensor([[image.height, image.width]]), keep)[0]

    def onnx(photo, image):
        """Read, pad into the canvas, run, post-process; returns (detections, seconds in onnxruntime)."""
        names, inputs, _ = example_inputs(recipe, canvas, photo)
        start = time.perf_counter()
        logits, boxes = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        seconds = time.perf_counter() - start
        outputs = {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}
        return postprocess(outputs, torch.tensor([[image.height, image.width]]), keep)[0], seconds

    times: dict[str, list[float]] = {name: [] for name in ("read_preprocess", "pytorch_model", "pytorch_photo",
                                                           "onnxruntime_model", "onnxruntime_photo")}
    score_diff = 0.0
    with torch.inference_mode():
        image, tensor = read(photos[0])
        pytorch(image, tensor), onnx(photos[0], image)  # warm-up
        for photo in photos:
            start = time.perf_counter()
            image, tensor = read(photo)
            middle = time.perf_counter()
            ours = pytorch(image, tensor)
            end = time.perf_counter()
            times["read_preprocess"].append(middle - start)
            times["pytorch_model"].append(end - middle)
            times["pytorch_photo"].append(end - start)
            start = time.perf_counter()
            theirs, seconds = onnx(photo, image)  # the whole path again: read, preprocess, pad, run, post-process
            times["onnxruntime_photo"].append(time.perf_counter() - start)
            times["onnxruntime_model"].append(seconds)
            top = min(10, len(ours["scores"]))
            score_diff = max(score_diff, float((ours["scores"][:top] - theirs["scores"][:top]).abs().max()))
    summary = {"weights": args.weights, "onnx": str(args.onnx), "photos": len(photos), "threads": args.threads,
               "input": list(tensor.shape[1:]), "onnx_canvas": list(canvas),
               **{f"{name}_s": round(statistics.median(t), 3) for name, t in times.items()},
               "max_top10_score_diff": round(score_diff, 4)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
