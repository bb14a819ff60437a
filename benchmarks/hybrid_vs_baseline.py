"""H-DETR's claim on the embedded data: does the hybrid branch train a better detector in the same epochs?

    python benchmarks/hybrid_vs_baseline.py                       # recipes' epochs, seeds 0 1
    python benchmarks/hybrid_vs_baseline.py --epochs 6 --seeds 0 1 2 --jobs 2

Trains recipes/hdetr-shapes.yaml (one-to-one + one-to-many queries) and
recipes/deformable-detr-shapes.yaml (the same model, one-to-one queries only) for the same epochs
with each seed, evaluating COCO bbox AP on shapes-det val after every epoch. Writes a table (AP,
AP50 of the last epoch: mean, std and range over seeds; wall time) and an AP-vs-epoch plot into
docs/results.md and docs/hybrid_vs_baseline.png. ``--jobs N`` runs N trainings at once, each on
``--threads`` threads (timings are then per-run wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.markdown import write_section  # noqa: E402

SECTION = "## H-DETR vs Deformable-DETR on shapes-det (`benchmarks/hybrid_vs_baseline.py`)"
RECIPES = {"H-Deformable-DETR": "hdetr-shapes.yaml", "Deformable-DETR": "deformable-detr-shapes.yaml"}


def launch(recipe: str, seed: int, epochs: int, out: Path, threads: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "dfx", "train", str(REPO / "recipes" / recipe), f"train.seed={seed}",
               f"train.epochs={epochs}", *extra, "--out", str(out), "--json"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def curve(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row[f"val/{key}"] for row in rows if f"val/{key}" in row]


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, colour) in zip(curves, ("tab:red", "tab:blue")):
        for index, values in enumerate(curves[name]):
            ax.plot(range(1, len(values) + 1), [100 * v for v in values], color=colour, alpha=0.8,
                    label=name if index == 0 else None, marker="o", markersize=3)
    ax.set_xticks(range(1, max(len(v) for runs in curves.values() for v in runs) + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val AP (COCO, %)")
    ax.set_title("shapes-det: hybrid branch vs one-to-one only (one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the recipes')")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--threads", type=int, default=None, help="threads per training (default: cores / jobs)")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to both, e.g. train.batch_size=4")
    args = parser.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    if args.epochs is None:
        from dfx.recipe import load_recipe

        args.epochs = load_recipe(REPO / "recipes" / RECIPES["H-Deformable-DETR"]).train.epochs

    runs = [(name, seed) for seed in args.seeds for name in RECIPES]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="hybrid-vs-baseline-") as scratch:
        pending, active = list(runs), []
        while pending or active:
            while pending and len(active) < args.jobs:
                name, seed = pending.pop(0)
                out = Path(scratch) / f"{RECIPES[name].removesuffix('.yaml')}-seed{seed}"
                active.append((name, seed, out, launch(RECIPES[name], seed, args.epochs, out, threads,
                                                       args.overrides)))
            name, seed, out, process = active.pop(0)
            stdout, _ = process.communicate()
            if process.returncode:
                sys.exit(f"training {name} seed {seed} failed (exit {process.returncode})")
            summary = json.loads(stdout)
            results[(name, seed)] = {"AP": curve(out, "AP"), "AP50": curve(out, "AP50"),
                                     "seconds": summary["elapsed_s"]}
            print(f"{name} seed {seed}: AP {results[(name, seed)]['AP'][-1]:.4f} AP50 "
                  f"{results[(name, seed)]['AP50'][-1]:.4f} ({summary['elapsed_s']:.0f} s)", flush=True)

    lines = [SECTION, "",
             f"`python benchmarks/hybrid_vs_baseline.py --epochs {args.epochs} --seeds "
             f"{' '.join(map(str, args.seeds))} --jobs {args.jobs}{f' --threads {args.threads}' if args.threads else ''}"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`: recipes/hdetr-shapes.yaml and "
             "recipes/deformable-detr-shapes.yaml (identical but for the one-to-many queries), "
             f"{args.epochs} epochs each, CPU, {threads} thread(s) per run, {args.jobs} run(s) at a time. "
             "COCO bbox metrics on shapes-det val after the last epoch, mean ± std (min-max) over seeds.", "",
             "| model | seeds | AP % | AP50 % | run time (s) |", "|---|---|---|---|---|"]
    for name in RECIPES:
        mine = [results[(name, seed)] for seed in args.seeds]
        lines.append(f"| {name} | {len(mine)} | {spread([r['AP'][-1] for r in mine])} | "
                     f"{spread([r['AP50'][-1] for r in mine])} | {statistics.mean(r['seconds'] for r in mine):.0f} |")
    gain = [results[("H-Deformable-DETR", s)]["AP"][-1] - results[("Deformable-DETR", s)]["AP"][-1]
            for s in args.seeds]
    lines += ["", f"AP gain of the hybrid branch, per seed: {', '.join(f'{100 * g:+.1f}' for g in gain)} points "
              f"(mean {100 * statistics.mean(gain):+.1f}).", "",
              "![AP per epoch](hybrid_vs_baseline.png)", ""]
    plot({name: [results[(name, seed)]["AP"] for seed in args.seeds] for name in RECIPES},
         args.results.parent / "hybrid_vs_baseline.png")
    write_section(args.results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
