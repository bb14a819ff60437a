"""The operating curve of Expedit token clustering on a trained dfx run: alpha x clusters -> speed-up, metric drop.

    python benchmarks/cluster_demo.py RUN [--alpha 2 3] [--clusters 8x8 10x10 12x12] [--threads 2]
                                          [--repeats 20] [--warmup 3] [--results docs/results.md] [--json]

For every (alpha, clusters) pair the run's model is wrapped (dfx.cluster_report.wrap_model, weights
shared, temperature calibrated as `dfx cluster --temperature auto` does: 2 / the median squared
token-centre distance at block alpha on 8 validation images), then:

- the run's validation metric (its ``eval.metric`` and the task's others) on the whole validation
  split, baseline once, each variant once; drop in points (x100, positive = worse);
- latency, batch 1, ``--threads`` threads: ONE ``compare_latency`` call over the baseline and every
  variant together, so each round runs one pass of every model in rotated order. On a shared, loaded
  machine absolute times move with the load, but a drift reaches all models alike within a round, so
  the speed-up (median baseline time / median variant time) measured this way is robust to it;
- GFLOPs of the whole model and of the backbone alone (the ViT with the DPT taps).

Prints a markdown table; with ``--results`` replaces its section of that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--alpha", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--clusters", nargs="+", default=["8x8", "10x10", "12x12"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=20, help="centres each token is reconstructed from")
    parser.add_argument("--iters", type=int, default=5, help="clustering iterations")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-metric", action="store_true", help="latency and GFLOPs only (no validation pass)")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from dfx.cluster.analysis import AUTO_SHARPNESS, assignment_sharpness
    from dfx.cluster_report import TASK_METRICS, LOWER_IS_BETTER, BackboneOnly, parse_clusters, wrap_model
    from dfx.engine import distributed as D
    from dfx.engine.trainer import evaluate, make_loader
    from dfx.measure import compare_latency, count_flops
    from dfx.models import build

    recipe, task, baseline, _ = build(Path(args.run), [], read_data=True)
    baseline.eval()
    dataset = task.dataset("val")
    size = dataset[0][0].shape[-1]
    sample = torch.stack([dataset[i][0] for i in range(8)])
    ctx = D.Context(device=torch.device("cpu"))
    loader = make_loader(dataset, recipe.eval.batch_size, ctx, shuffle=False, seed=0, num_workers=0,
                         collate_fn=task.collate_fn)
    key = recipe.eval.metric
    keys = [key, *(k for k in TASK_METRICS.get(recipe.task, ()) if k != key)]

    def metrics(model) -> dict:
        if args.no_metric:
            return {}
        values = evaluate(task, model, loader, ctx)
        return {k: float(values[k]) for k in keys if k in values}

    def drop(name: str, base: float, value: float) -> float:
        lower = name in LOWER_IS_BETTER or (name == key and recipe.eval.mode == "min")
        return (value - base) * 100 if lower else (base - value) * 100

    start = time.time()
    variants = {"baseline": baseline}
    rows = {"baseline": {"alpha": None, "clusters": None, "metrics": metrics(baseline)}}
    for alpha in args.alpha:
        for text in args.clusters:
            clusters = parse_clusters(text)
            settings = dict(image_size=size, clusters=clusters, k=args.k, iters=args.iters)
            probe = wrap_model(baseline, 1.0, alpha, **settings)
            temperature = AUTO_SHARPNESS / assignment_sharpness(probe, sample)["distance"]
            model = wrap_model(baseline, 1.0, alpha, temperature=temperature, **settings)
            name = f"alpha {alpha}, {text}"
            variants[name] = model
            rows[name] = {"alpha": alpha, "clusters": text, "temperature": temperature, "metrics": metrics(model)}
            print(f"{name}: {rows[name]['metrics']} ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    image = sample[:1]
    with torch.no_grad():
        times = compare_latency(variants, image, args.warmup, args.repeats)
        backbone_times = compare_latency({n: BackboneOnly(m) for n, m in variants.items()}, image, args.warmup,
                                         args.repeats)
    base_ms = statistics.median(times["baseline"]) * 1e3
    base_backbone_ms = statistics.median(backbone_times["baseline"]) * 1e3
    base_flops = count_flops(baseline, image)
    base_backbone_flops = count_flops(BackboneOnly(baseline), image)
    for name, model in variants.items():
        row = rows[name]
        row["latency_ms"] = statistics.median(times[name]) * 1e3
        row["backbone_latency_ms"] = statistics.median(backbone_times[name]) * 1e3
        row["speedup"] = base_ms / row["latency_ms"]
        row["backbone_speedup"] = base_backbone_ms / row["backbone_latency_ms"]
        row["gflops"] = count_flops(model, image) / 1e9
        row["flops_ratio"] = base_flops / 1e9 / row["gflops"]
        row["backbone_flops_ratio"] = base_backbone_flops / count_flops(BackboneOnly(model), image)
        row["drops"] = {k: drop(k, rows["baseline"]["metrics"][k], v) for k, v in row["metrics"].items()}
        row["backbone_gflops"] = count_flops(BackboneOnly(model), image) / 1e9
    model_name = getattr(recipe.model, "name", None) or recipe.model.backbone
    report = {"run": args.run, "model": model_name, "image_size": size, "threads": args.threads,
              "repeats": args.repeats, "warmup": args.warmup, "k": args.k, "iters": args.iters, "metric": key,
              "rows": rows,
              "seconds": time.time() - start, "torch": torch.__version__}
    if args.json:
        print(json.dumps(report))
    table = markdown(report, keys)
    print(table)
    if args.results:
        from benchmarks.markdown import write_section

        write_section(args.results, table)
    return 0


def markdown(report: dict, keys: list[str]) -> str:
    base = report["rows"]["baseline"]
    lines = [f"## Expedit token clustering on `{Path(report['run']).name}`: alpha x clusters", "",
             f"`python benchmarks/cluster_demo.py {report['run']}`: {report['model']} at {report['image_size']} px, "
             f"baseline {', '.join(f'{k} {v:.4f}' for k, v in base['metrics'].items())}. Latency batch 1, "
             f"{report['threads']} threads, median of {report['repeats']} rounds, all variants interleaved in one "
             "process (robust to the machine's load; the absolute times are loaded ones). Drops in points "
             f"(x100, positive = worse). Temperature auto per variant; k {report['k']}, iters {report['iters']}, "
             "clustering window 5.", "",
             "| alpha | clusters | " + " | ".join(f"{k} drop" for k in keys)
             + " | GFLOPs | FLOPs ratio | latency (ms) | **speed-up** | backbone speed-up |",
             "|---|---|" + "---|" * (len(keys) + 5)]
    for name, row in report["rows"].items():
        drops = " | ".join(f"{row['drops'].get(k, float('nan')):+.2f}" for k in keys)
        lines.append(f"| {row['alpha'] or '—'} | {row['clusters'] or 'baseline'} | {drops} | {row['gflops']:.3f} | "
                     f"{row['flops_ratio']:.2f} | {row['latency_ms']:.1f} | **{row['speedup']:.2f}×** | "
                     f"{row['backbone_speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
