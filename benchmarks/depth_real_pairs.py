"""A depth run on the three real RGB-D pairs of ../shared/data/rgbd-samples: the figure and table of docs/depth.md.

    python benchmarks/depth_real_pairs.py RUN_DIR [--samples DIR] [--out docs/depth_real_pairs.jpg]
                                          [--shapes-out docs/depth_shapes.jpg] [--json]

For each pair (NYU raw Kinect PGM, SUN RGB-D PNG, TUM PNG at 5000 units per metre) it runs
``dfx predict`` on the colour image (the 16-bit depth PNG and picture it writes) and ``dfx eval``
on the pair as a one-line file list with that pair's ``data.depth_encoding`` / ``depth_scale``
(input at 480x640, no crop), then draws colour image | predicted depth | ground truth (the same
colour map and range, taken from the ground truth's inverse depth; black = no return) in one row
per pair, and prints a markdown table of the metrics. ``--shapes-out``: the same three columns for
the first six validation images of the run's own data (shapes-depth), side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PAIRS = {  # name: (colour file, depth file, overrides that decode its depth)
    "NYU": ("NYU_color.ppm", "NYU_depth.pgm", ["data.depth_encoding=nyu-raw"]),
    "SUN": ("SUN_color.jpg", "SUN_depth.png", ["data.depth_encoding=sunrgbd"]),
    "TUM": ("TUM_color.png", "TUM_depth.png", ["data.depth_encoding=linear", "data.depth_scale=5000"]),
}


def colour_pair(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both depth maps (metres) colour-mapped with the ground truth's inverse-depth range (magma)."""
    from matplotlib import colormaps

    valid = truth > 0
    inverse = 1 / truth[valid]
    low, high = np.percentile(inverse, [2, 98])

    def paint(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
        scaled = np.clip((1 / np.maximum(depth, 1e-6) - low) / max(high - low, 1e-12), 0, 1)
        rgb = (colormaps["magma"](scaled)[..., :3] * 255).round().astype(np.uint8)
        rgb[~mask] = 0
        return rgb

    return paint(predicted, np.ones_like(valid)), paint(truth, valid)


def main(argv=None) -> dict:
    from dfx.data.depth import read_depth_target
    from dfx.engine import evaluate_checkpoint
    from dfx.models import read_source
    from dfx.predict import predict
    from dfx.tasks.depth import DataConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a depth run directory or checkpoint")
    parser.add_argument("--samples", default="../shared/data/rgbd-samples")
    parser.add_argument("--out", default="docs/depth_real_pairs.jpg")
    parser.add_argument("--shapes-out", default="docs/depth_shapes.jpg")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    samples = Path(args.samples)
    recipe, _ = read_source(args.run)
    rows, table = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (colour, depth, overrides) in PAIRS.items():
            listing = Path(tmp) / f"{name}.txt"
            listing.write_text(f"{colour} {depth}\n")
            result = evaluate_checkpoint(args.run, [f"data.root={samples}", f"data.val_split={listing}",
                                                    "data.image_size=[480,640]", "eval.crop=none", *overrides],
                                         device="cpu")
            table[name] = result["metrics"]
            summary = predict(args.run, [str(samples / colour)], out=Path(tmp) / f"pred-{name}",
                              overrides=["data.image_size=[480,640]"], device="cpu", quiet=True)
            written = json.loads((Path(summary["out"]) / "predictions.jsonl").read_text().splitlines()[0])
            predicted = np.asarray(Image.open(Path(summary["out"]) / written["depth"]), dtype=np.float32) / 1000
            section = DataConfig(**{o.split("=")[0].split(".")[1]: _value(o.split("=")[1]) for o in overrides})
            truth = read_depth_target(samples / depth, section.depth)
            image = np.asarray(Image.open(samples / colour).convert("RGB"))
            rows.append(np.concatenate([image, *colour_pair(predicted, truth)], axis=1))
    width = min(r.shape[1] for r in rows)
    figure = np.concatenate([np.asarray(Image.fromarray(r).resize((width, r.shape[0] * width // r.shape[1])))
                             for r in rows], axis=0)
    Image.fromarray(figure).resize((figure.shape[1] // 2, figure.shape[0] // 2), Image.LANCZOS).save(args.out,
                                                                                                   quality=85)
    if args.shapes_out:
        own_data_figure(args.run, args.shapes_out)
    keys = ("AbsRel", "RMSE", "RMSE_log", "d1")
    lines = [f"| pair | {' | '.join(keys)} |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {n} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |" for n, m in table.items()]
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    report = {"run": args.run, "recipe": recipe.name, "metrics": table, "figure": args.out}
    if args.json:
        print(json.dumps(report))
    return report


def own_data_figure(run: str, out: str, count: int = 6) -> None:
    """Image | prediction | ground truth for the first ``count`` validation images, 4x nearest-upscaled."""
    import torch

    from dfx.models import build

    recipe, task, model, _ = build(run)
    dataset = task.dataset("val")
    mean = torch.tensor(recipe.data.mean).view(3, 1, 1)
    std = torch.tensor(recipe.data.std).view(3, 1, 1)
    columns = []
    with torch.no_grad():
        for index in range(count):
            image, truth = dataset[index]
            predicted = model(image[None])[0, 0].numpy()
            pixels = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            columns.append(np.concatenate([pixels, *colour_pair(predicted, truth.numpy())], axis=0))
    figure = np.concatenate(columns, axis=1)
    Image.fromarray(figure).resize((figure.shape[1] * 3, figure.shape[0] * 3), Image.NEAREST).save(out, quality=90)


def _value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


if __name__ == "__main__":
    main()
