"""Speed-up and feature fidelity of Expedit token clustering on plain ViTs: the table of docs/cluster.md.

    python benchmarks/cluster_speed.py [--quick] [--warmup W] [--repeats R] [--images N] [--threads T]
                                       [--plot PATH] [--json]

Models (random weights, batch 1): ViT-B/16 and ViT-L/16 at 384 px (24×24 patch tokens), each unclustered
and clustered at ratios 0.25, 0.5 and 0.75 with the wrapper's defaults (alpha = 40% of the depth:
5 of 12, 10 of 24; iters 5, window 5, temperature 0.02, k 20). `--quick`: ViT-Ti/16 and ViT-S/16 at
224 px (14×14 tokens), fewer passes (under a minute), no plot unless --plot is given.

- latency: median over `repeats` rounds; each round runs one pass of every variant of a model, the
  order rotated from round to round (dfx.measure.compare_latency), after `warmup` passes of each;
- FLOPs bound: baseline GFLOPs / clustered GFLOPs (dfx.measure.count_flops): the speed-up if time
  followed FLOPs; efficiency = speedup / FLOPs bound;
- fidelity: cosine similarity of the clustered model's reconstructed final patch tokens to the
  baseline's, mean and minimum over all tokens of `images` shapes-seg validation images resized to
  the model's size. With random weights this measures how well clustering + reconstruction
  preserve features of an untrained network (smooth, weakly structured); trained weights are
  measured on a real task by `dfx cluster --model RUN_DIR`.

Prints a markdown table and writes the plot of speed-up against ratio with the FLOPs bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dfx.measure import compare_latency, count_flops
from dfx.cluster.analysis import dense_features
from dfx.cluster_report import wrap_model

RATIOS = (0.25, 0.5, 0.75)
FULL = {"models": {"ViT-B/16": "vit_base_patch16_384", "ViT-L/16": "vit_large_patch16_384"}, "size": 384,
        "warmup": 1, "repeats": 5, "images": 2, "plot": "docs/cluster_speedup.png"}
QUICK = {"models": {"ViT-Ti/16": "vit_tiny_patch16_224", "ViT-S/16": "vit_small_patch16_224"}, "size": 224,
         "warmup": 1, "repeats": 3, "images": 2, "plot": None}


def fidelity_images(count: int, size: int) -> torch.Tensor:
    """[count, 3, size, size] validation images of the embedded shapes-seg, normalised like dfx cluster's."""
    from dfx.data.embedded import embedded_root
    from dfx.data.segmentation import SegmentationFolder, SegmentationTransform

    dataset = SegmentationFolder(embedded_root("shapes-seg"), "val", SegmentationTransform(size, training=False))
    return torch.stack([dataset[i][0] for i in range(count)])


def measure_model(label: str, name: str, size: int, warmup: int, repeats: int, images: torch.Tensor) -> list[dict]:
    """One row per variant (baseline first) of timm model ``name`` at ``size`` px."""
    import timm

    torch.manual_seed(0)
    baseline = timm.create_model(name, pretrained=False, img_size=size).eval()
    variants = {"baseline": baseline, **{ratio: wrap_model(baseline, ratio) for ratio in RATIOS}}
    example = images[:1]
    started = time.perf_counter()
    times = compare_latency(variants, example, warmup, repeats)
    flops = {key: count_flops(model, example) for key, model in variants.items()}
    with torch.no_grad():  # the baseline's features, computed once for all ratios
        reference = dense_features(baseline, images).double()
    rows = []
    base_ms = statistics.median(times["baseline"]) * 1e3
    for key, model in variants.items():
        latency = statistics.median(times[key]) * 1e3
        row = {"model": label, "timm": name, "ratio": 1.0 if key == "baseline" else key, "clustered": key != "baseline",
               "gflops": flops[key] / 1e9, "latency_ms": latency, "speedup": base_ms / latency,
               "flops_bound": flops["baseline"] / flops[key]}
        row["efficiency"] = row["speedup"] / row["flops_bound"]
        if key != "baseline":
            settings = model.hourglass_config
            grid = tuple(model.patch_embed.grid_size)
            with torch.no_grad():
                cosine = F.cosine_similarity(dense_features(model, images).double(), reference, dim=-1)
            row.update(alpha=settings.alpha, depth=len(model.blocks), grid=list(grid),
                       clustered_grid=list(model.clustered_grid(grid)), cosine_mean=float(cosine.mean()),
                       cosine_min=float(cosine.min()))
        rows.append(row)
    print(f"{label}: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], threads: int, size: int) -> str:
    lines = [f"| model ({size} px) | ratio | tokens after α | α | GFLOPs | FLOPs bound | latency (ms) | speed-up | "
             "efficiency | cosine mean | cosine min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if not row["clustered"]:
            lines.append(f"| {row['model']} | — (baseline) | | | {row['gflops']:.1f} | 1.00 | {row['latency_ms']:.0f} "
                         f"| 1.00 | | | |")
            continue
        (H, W), (h, w) = row["grid"], row["clustered_grid"]
        lines.append(f"| {row['model']} | {row['ratio']} | {H}×{W} → {h}×{w} | {row['alpha']}/{row['depth']} | "
                     f"{row['gflops']:.1f} | {row['flops_bound']:.2f} | {row['latency_ms']:.0f} | "
                     f"{row['speedup']:.2f} | {row['efficiency']:.2f} | {row['cosine_mean']:.3f} | "
                     f"{row['cosine_min']:.3f} |")
    device = "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    lines.append(f"\nBatch 1, float32, {device}, {threads} thread(s), random weights, torch {torch.__version__}.")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for index, model in enumerate(dict.fromkeys(row["model"] for row in rows)):
        mine = [r for r in rows if r["model"] == model and r["clustered"]]
        ratios = [r["ratio"] for r in mine]
        colour = f"C{index}"
        ax.plot(ratios, [r["speedup"] for r in mine], "o-", color=colour, label=f"{model} measured")
        ax.plot(ratios, [r["flops_bound"] for r in mine], "--", color=colour, alpha=0.7, label=f"{model} FLOPs bound")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("cluster ratio (share of tokens kept after α)")
    ax.set_ylabel("speed-up over the unclustered model")
    ax.set_xticks(RATIOS)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Expedit token clustering, batch 1, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and few passes (< 1 min)")
    parser.add_argument("--warmup", type=int, help="unmeasured passes of each variant")
    parser.add_argument("--repeats", type=int, help="measured rounds")
    parser.add_argument("--images", type=int, help="images for the feature fidelity")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--plot", help="where to write the plot (default docs/cluster_speedup.png; none with --quick)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args()
    config = dict(QUICK if args.quick else FULL)
    config.update({key: value for key in ("warmup", "repeats", "images", "plot")
                   if (value := getattr(args, key)) is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    images = fidelity_images(config["images"], config["size"])
    rows = []
    for label, name in config["models"].items():
        rows += measure_model(label, name, config["size"], config["warmup"], config["repeats"], images)
    if config["plot"]:
        plot(rows, config["plot"])
        print(f"plot written to {config['plot']}", file=sys.stderr)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, torch.get_num_threads(), config["size"]))


if __name__ == "__main__":
    main()
