"""``dfx compare``: a fair, multi-seed benchmark of recipe variants.

Every variant (a recipe plus overrides) is trained once per seed with the same data and schedule,
each run in its own ``dfx train`` process (``--jobs`` of them at a time, the machine's threads
shared out between them), into ``runs/compare/<name>/runs/<variant>/seed-<s>``. A finished run
leaves ``result.json`` beside its run directory and is never trained again; an interrupted one is
resumed from its last checkpoint. The table reports, per variant, the metric's mean ± standard
deviation and range over seeds, wall time, parameters, GFLOPs and latency, and, per variant
against the first, the paired per-seed differences with a 95% t-interval and a plain reading.
Outputs: ``compare.json``, ``compare.csv``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from dfx.errors import RunError, UsageError
from dfx.files import atomic_write, save_figure, write_text_atomic
from dfx.recipe import Recipe, load_recipe

COMPARE_ROOT = Path("runs") / "compare"
FRACTION_METRICS = ("AP", "mIoU", "top1", "top5", "pixel_acc")  # reported in points (× 100)


@dataclass
class Variant:
    """One arm of a comparison: a recipe and the overrides that make it this variant."""

    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)


def parse_variant(spec: str) -> Variant:
    """``recipes/a.yaml`` or ``recipes/a.yaml:key=value[:key=value…]`` (or a shipped recipe's name,
    ``a:key=value``); named after the recipe stem and the override values (``hdetr-shapes:one2many_k=3``)."""
    path, _, rest = spec.partition(".yaml")
    if not _:
        path, _, rest = spec.partition(".yml")
    if _:
        recipe = path + _
    else:  # a shipped recipe's name: no suffix, the overrides after the first colon
        recipe, colon, rest = spec.partition(":")
        rest = colon + rest
    if rest and not rest.startswith(":"):
        raise UsageError(f"variant {spec!r}: expected RECIPE.yaml or RECIPE.yaml:key=value[:key=value…]")
    overrides = [o for o in rest[1:].split(":") if o] if rest else []
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UsageError(f"variant {spec!r}: {bad[0]!r} is not an override key=value")
    label = ":".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in (o.split("=", 1) for o in overrides))
    return Variant(Path(recipe).stem + (f":{label}" if label else ""), recipe, overrides)


def read_variants(specs: Iterable[str | Variant]) -> list[Variant]:
    """Variants from specs (or :class:`Variant` objects, taken as they are); a YAML file holding a
    list of ``{name, recipe, overrides}`` (or a mapping with such a ``variants`` list) names several
    at once, its recipes relative to it (else shipped recipes by name)."""
    variants: list[Variant] = []
    for spec in specs:
        if isinstance(spec, Variant):
            variants.append(spec)
            continue
        path = Path(spec)
        entries = _variant_list(path) if path.suffix in (".yaml", ".yml") and path.is_file() else None
        if entries is None:
            variants.append(parse_variant(spec))
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "recipe" not in entry:
                raise UsageError(f"{path}: variant {i + 1} must be a mapping with 'recipe' (and 'name', 'overrides')")
            recipe = Path(entry["recipe"])
            beside = path.parent / recipe
            recipe = beside if not recipe.is_absolute() and not recipe.exists() and beside.exists() else recipe
            overrides = entry.get("overrides") or []
            if not isinstance(overrides, list):
                raise UsageError(f"{path}: variant {i + 1}: overrides must be a list of key=value strings")
            variant = parse_variant(":".join([str(recipe), *map(str, overrides)]))
            variants.append(Variant(str(entry.get("name") or variant.name), variant.recipe, variant.overrides))
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"variants named twice: {', '.join(dupes)}; give them distinct overrides or names")
    if len(variants) < 1:
        raise UsageError("dfx compare needs at least one variant (a recipe, optionally with :key=value overrides)")
    return variants


def _variant_list(path: Path) -> list | None:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None  # loading it as a recipe reports the error with its line
    if isinstance(tree, list):
        return tree
    if isinstance(tree, dict) and isinstance(tree.get("variants"), list):
        return tree["variants"]
    return None  # an ordinary recipe


def load_variants(variants: list[Variant], overrides: Iterable[str]) -> dict[str, Recipe]:
    """Every variant's recipe, validated before anything trains; one task and one metric for all."""
    recipes = {v.name: load_recipe(v.recipe, [*overrides, *v.overrides]) for v in variants}
    kinds = {name: (r.task, r.eval.metric, r.eval.mode) for name, r in recipes.items()}
    if len(set(kinds.values())) > 1:
        listing = "; ".join(f"{name}: task {t}, metric {m} ({mode})" for name, (t, m, mode) in kinds.items())
        raise UsageError(f"variants must share one task and eval.metric to be compared: {listing}")
    return recipes


# ------------------------------------------------------------------------------------------------
# statistics


def summary(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max of the values (None when there are none)."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def paired_difference(a: dict[int, float], b: dict[int, float], mode: str = "max", confidence: float = 0.95) -> dict:
    """``b − a`` over the seeds both finished: mean, t-interval and a reading.

    The reading is "better" when the whole interval favours ``b`` (above 0 for a metric to
    maximise), "worse" when it favours ``a``, else "no clear difference".
    """
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    diffs = [b[s] - a[s] for s in seeds]
    out = {"seeds": seeds, "n": len(diffs), "mean": None, "low": None, "high": None, "reading": "not enough seeds"}
    if not diffs:
        return out
    s = summary(diffs)
    out["mean"] = s["mean"]
    if len(diffs) < 2:
        return out
    half = stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * s["std"] / math.sqrt(len(diffs))
    out["low"], out["high"] = s["mean"] - half, s["mean"] + half
    sign = 1 if mode == "max" else -1
    if sign * out["low"] > 0 and sign * out["high"] > 0:
        out["reading"] = "better"
    elif sign * out["low"] < 0 and sign * out["high"] < 0:
        out["reading"] = "worse"
    else:
        out["reading"] = "no clear difference"
    return out


def scale_of(metric: str) -> float:
    """Metrics that are fractions are reported in points (AP 0.452 → 45.2; mask AP ``segm/AP`` and
    keypoint AP ``keypoints/AP`` too, per class as well)."""
    parts = metric.split("/")
    name = parts[1] if parts[0] in ("segm", "keypoints") and len(parts) > 1 else parts[0]
    return 100.0 if name in FRACTION_METRICS else 1.0


def reading_line(name: str, baseline: str, diff: dict, metric: str) -> str:
    """``"B − A = +1.9 AP [0.8, 3.0], 8 seeds: better"``."""
    if diff["mean"] is None:
        return f"{name} − {baseline}: no seed finished for both"
    interval = (f" [{format_metric(diff['low'], metric)}, {format_metric(diff['high'], metric)}]"
                if diff["low"] is not None else "")
    return (f"{name} − {baseline} = {format_metric(diff['mean'], metric, signed=True)} {metric}{interval}, {diff['n']} seed"
            f"{'s' if diff['n'] != 1 else ''}: {diff['reading']}")


# ------------------------------------------------------------------------------------------------
# runs


def _threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def run_one(variant: Variant, seed: int, overrides: list[str], folder: Path, *, threads: int, device: str) -> dict:
    """Train one variant × seed in its own ``dfx train`` process; the result (also on failure).

    ``folder/result.json`` marks a finished run; a run directory with a last checkpoint is resumed.
    """
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    run_dir = folder / "run"
    args = [sys.executable, "-m", "dfx", "train", variant.recipe, *overrides, *variant.overrides,
            f"train.seed={seed}", "--json", "--quiet", "--device", device]
    if (run_dir / "checkpoints" / "last.state.pt").is_file():
        args += ["--resume", str(run_dir)]
    else:
        if run_dir.exists():  # started but no epoch saved: nothing to keep
            shutil.rmtree(run_dir)
        args += ["--out", str(run_dir)]
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(folder / "train.log", "a") as log:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    wall = time.perf_counter() - started
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"error": f"dfx train exited {proc.returncode} without a result; see {folder / 'train.log'}"}
    record = {"variant": variant.name, "seed": seed, "wall_s": round(wall, 1), "run_dir": str(run_dir)}
    if proc.returncode != 0 or "error" in result:
        return {**record, "status": "failed", "reason": result.get("error", f"exit {proc.returncode}")}
    record.update(status="done", metrics=result.get("metrics", {}), epochs=result.get("epochs"))
    write_text_atomic(done, json.dumps(record, indent=1))
    return record


def _comparison_dir(name: str | None, variants: list[Variant], out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    stem = name or "-vs-".join(dict.fromkeys(Path(v.recipe).stem for v in variants))
    return COMPARE_ROOT / stem.replace(":", "_").replace("/", "_")


def _check_plan(folder: Path, plan: dict) -> None:
    """A comparison folder holds one plan: resuming it with other variants or seeds is refused."""
    file = folder / "plan.json"
    if file.is_file():
        previous = json.loads(file.read_text())
        if previous != plan:
            raise UsageError(f"{folder} holds a comparison of other variants, overrides or seeds; pass --name or "
                             "--out to start another one, or repeat the same command to resume it")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, json.dumps(plan, indent=1))


def compare(specs: Iterable[str], overrides: Iterable[str] = (), *, seeds: Iterable[int] = (0,), jobs: int = 1,
            name: str | None = None, out: str | Path | None = None, device: str = "cpu",
            log: Callable[[str], None] = lambda line: None, measure_cost: bool = True) -> dict:
    """Train every variant × seed (``jobs`` at a time), then tabulate; returns the compare.json content."""
    variants = read_variants(specs)
    overrides, seeds = list(overrides), list(dict.fromkeys(int(s) for s in seeds))
    if not seeds or min(seeds) < 0:
        raise UsageError(f"--seeds: expected one or more seeds >= 0, got {seeds}")
    if jobs < 1:
        raise UsageError(f"--jobs: expected >= 1, got {jobs}")
    recipes = load_variants(variants, overrides)
    first = next(iter(recipes.values()))
    metric, mode = first.eval.metric, first.eval.mode
    folder = _comparison_dir(name, variants, out)
    _check_plan(folder, {"variants": [asdict(v) for v in variants], "overrides": overrides, "seeds": seeds})
    threads = _threads_per_job(jobs)
    todo = [(v, s) for s in seeds for v in variants]  # seed by seed: a comparison cut short stays paired
    log(f"dfx compare: {len(variants)} variants × {len(seeds)} seeds = {len(todo)} runs, {jobs} at a time "
        f"({threads} thread{'s' if threads > 1 else ''} each) in {folder}")
    results: list[dict] = []

    def one(item: tuple[Variant, int]) -> dict:
        variant, seed = item
        result = run_one(variant, seed, overrides, folder / "runs" / _safe(variant.name) / f"seed-{seed}",
                         threads=threads, device=device)
        results.append(result)
        value = result.get("metrics", {}).get(metric)
        state = f"{metric} {value:.4g}" if value is not None else f"failed: {result.get('reason')}"
        log(f"[{len(results)}/{len(todo)}] {variant.name} seed {seed}: {state} ({result['wall_s']:.0f} s)")
        return result

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        ordered = list(pool.map(one, todo))
    rows = tabulate(variants, ordered, metric, mode)
    if measure_cost:
        for row, cost in zip(rows, measure_costs(recipes, ordered, device)):
            row.update(cost)
    report = {"name": folder.name, "task": first.task, "metric": metric, "mode": mode, "seeds": seeds,
              "overrides": overrides, "jobs": jobs, "threads_per_job": threads, "rows": rows,
              "readings": [reading_line(r["variant"], rows[0]["variant"], r["vs_first"], metric) for r in rows[1:]],
              "runs": ordered, "dir": str(folder)}
    write_report(folder, report)
    empty = [row for row in rows if not row["per_seed"]]
    if empty:
        failure = empty[0]["failed"][0] if empty[0]["failed"] else {"seed": "-", "reason": f"no {metric}"}
        raise RunError(f"dfx compare: every run of {', '.join(r['variant'] for r in empty)} failed (seed "
                       f"{failure['seed']}: {failure['reason']}); nothing to compare, see {folder}/compare.md")
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def tabulate(variants: list[Variant], results: list[dict], metric: str, mode: str) -> list[dict]:
    """One row per variant: the metric over seeds, wall time, failures, and the paired comparison
    with the first variant."""
    per_variant = {v.name: {r["seed"]: r["metrics"][metric] for r in results
                            if r["variant"] == v.name and r["status"] == "done" and metric in r.get("metrics", {})}
                   for v in variants}
    baseline = per_variant[variants[0].name]
    rows = []
    for v in variants:
        mine = [r for r in results if r["variant"] == v.name]
        values = per_variant[v.name]
        finished = [r["metrics"] for r in mine if r["status"] == "done"]
        means = {k: sum(m[k] for m in finished) / len(finished) for k in (finished[0] if finished else {})
                 if all(isinstance(m.get(k), (int, float)) for m in finished)}
        rows.append({"variant": v.name, "recipe": v.recipe, "overrides": v.overrides,
                     "metric": summary(list(values.values())), "per_seed": values, "metrics_mean": means,
                     "wall_s": summary([r["wall_s"] for r in mine if r["status"] == "done"])["mean"],
                     "failed": [{"seed": r["seed"], "reason": r["reason"]} for r in mine if r["status"] == "failed"],
                     "vs_first": paired_difference(baseline, values, mode)})
    return rows


def measure_costs(recipes: dict[str, Recipe], results: list[dict], device: str) -> list[dict]:
    """Parameters, GFLOPs and batch-1 latency of each variant's model, measured side by side."""
    from dfx.measure import compare_latency, count_flops, summarize_times
    from dfx.engine import distributed as D
    from dfx.models import build

    dev = D.resolve_device(device)
    models, inputs = {}, {}
    for name, recipe in recipes.items():
        run = next((r for r in results if r["variant"] == name and r["status"] == "done"), None)
        if run is None:
            continue
        model = build(run["run_dir"], ["model.weights=null"])[2].to(dev)
        models[name], inputs[name] = model, example_input(recipe, dev)
    costs = {name: {"params_m": sum(p.numel() for p in m.parameters()) / 1e6,
                    "gflops": count_flops(m, inputs[name]) / 1e9} for name, m in models.items()}
    if models:
        shapes = {tuple(_shape(x)) for x in inputs.values()}
        if len(shapes) == 1:  # side by side needs one input for all
            times = compare_latency(models, next(iter(inputs.values())), warmup=2, repeats=10)
        else:
            times = {n: compare_latency({n: m}, inputs[n], warmup=2, repeats=10)[n] for n, m in models.items()}
        for name in models:
            costs[name]["latency_ms"] = summarize_times(times[name], 1)["latency_ms"]
    return [costs.get(name, {}) for name in recipes]


def example_input(recipe: Recipe, device):
    """One input of the size the recipe evaluates at (detection: its largest scale, square)."""
    import torch

    from dfx.models import native_size

    size = native_size(recipe) or 224
    hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if recipe.task in ("fusion", "translation"):
        return torch.randn(1, len(recipe.data.modalities), 3, *hw, device=device)
    return torch.randn(1, 3, *hw, device=device)


def _shape(x):
    return x.shape if hasattr(x, "shape") else [len(x), *x[0].shape]


# ------------------------------------------------------------------------------------------------
# report


def format_metric(value: float | None, metric: str, signed: bool = False) -> str:
    """Points with one decimal for fractions (AP 45.2); three decimals for the others (AbsRel 0.112, RMSE 0.357)."""
    if value is None:
        return "-"
    k = scale_of(metric)
    return f"{k * value:{'+' if signed else ''}.{1 if k != 1 else 3}f}"


def sub_metrics(report: dict, most: int = 4) -> list[str]:
    """Parts of the main metric worth a column (``mIoU/rgb``, ``mIoU/depth``), when there are few;
    and a box metric's mask counterpart (``segm/AP`` beside ``AP``) when the runs have masks."""
    keys = list(dict.fromkeys(k for row in report["rows"] for k in row.get("metrics_mean", {})
                              if k.startswith(report["metric"] + "/")))
    masks = f"segm/{report['metric']}"
    companion = [masks] if any(masks in row.get("metrics_mean", {}) for row in report["rows"]) else []
    return companion + (keys if len(keys) <= most else [])


def markdown(report: dict) -> str:
    """The table: per variant mean ± std [min, max] over seeds, its parts (e.g. per-stream mIoU),
    cost, and the paired difference."""
    metric, parts = report["metric"], sub_metrics(report)
    lower = " (lower is better)" if report.get("mode") == "min" else ""
    lines = [f"| variant | {metric}{lower} mean ± std | range | seeds | " + "".join(f"{p} | " for p in parts)
             + "Δ vs first [95% CI] | reading | params (M) | GFLOPs | latency (ms) | train (s/run) |",
             "|---|---:|---:|---:|" + "---:|" * len(parts) + "---:|---|---:|---:|---:|---:|"]
    for i, row in enumerate(report["rows"]):
        m, d = row["metric"], row["vs_first"]
        spread = f"{format_metric(m['mean'], metric)} ± {format_metric(m['std'], metric)}" if m["n"] else "-"
        span = f"{format_metric(m['min'], metric)}–{format_metric(m['max'], metric)}" if m["n"] else "-"
        seeds = f"{m['n']}" + (f" ({len(row['failed'])} failed)" if row["failed"] else "")
        if i == 0:
            delta, reading = "(baseline)", ""
        elif d["mean"] is None:
            delta, reading = "-", d["reading"]
        else:
            ci = (f" [{format_metric(d['low'], metric, True)}, {format_metric(d['high'], metric, True)}]"
                  if d["low"] is not None else "")
            delta, reading = f"{format_metric(d['mean'], metric, True)}{ci}", d["reading"]
        cost = [f"{row[c]:.3g}" if row.get(c) is not None else "-" for c in ("params_m", "gflops", "latency_ms")]
        wall = f"{row['wall_s']:.0f}" if row.get("wall_s") is not None else "-"
        means = [format_metric(row.get("metrics_mean", {}).get(p), metric) for p in parts]
        lines.append(f"| {row['variant']} | {spread} | {span} | {seeds} | " + "".join(f"{m} | " for m in means)
                     + f"{delta} | {reading} | " + " | ".join(cost) + f" | {wall} |")
    failures = [f"- {row['variant']} seed {f['seed']}: {f['reason']}" for row in report["rows"] for f in row["failed"]]
    return "\n".join(lines) + "\n" + ("\nFailed runs:\n" + "\n".join(failures) + "\n" if failures else "")


def write_report(folder: Path, report: dict) -> None:
    """compare.json, compare.csv (one line per variant × seed), compare.md and compare.png."""
    write_text_atomic(folder / "compare.json", json.dumps(report, indent=1, default=str))

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["variant", "seed", "status", report["metric"], "wall_s", "reason", "run_dir"])
            for r in report["runs"]:
                writer.writerow([r["variant"], r["seed"], r["status"], r.get("metrics", {}).get(report["metric"], ""),
                                 r["wall_s"], r.get("reason", ""), r["run_dir"]])

    atomic_write(folder / "compare.csv", write_csv)
    write_text_atomic(folder / "compare.md", markdown(report))
    plot(report, folder / "compare.png")


def plot(report: dict, path: Path) -> None:
    """Left: every seed's metric per variant with mean ± std; right: paired differences with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows = report["metric"], report["rows"]
    k = scale_of(metric)
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 3.6),
                                      gridspec_kw={"width_ratios": [len(rows), max(1, len(rows) - 1)]})
    for i, row in enumerate(rows):
        values = [k * v for v in row["per_seed"].values()]
        left.scatter([i] * len(values), values, s=14, alpha=0.6)
        if row["metric"]["n"]:
            left.errorbar(i + 0.15, k * row["metric"]["mean"], yerr=k * row["metric"]["std"], fmt="o", color="black",
                          capsize=3)
    left.set_xticks(range(len(rows)))
    left.set_xticklabels([r["variant"] for r in rows], rotation=20, ha="right", fontsize=8)
    left.set_ylabel(f"{metric}" + (" (points)" if k != 1 else ""))
    left.grid(axis="y", alpha=0.3)
    others = [r for r in rows[1:] if r["vs_first"]["low"] is not None]
    for i, row in enumerate(others):
        d = row["vs_first"]
        right.errorbar(i, k * d["mean"], yerr=[[k * (d["mean"] - d["low"])], [k * (d["high"] - d["mean"])]],
                       fmt="o", capsize=4)
    right.axhline(0, color="grey", lw=0.8)
    right.set_xticks(range(len(others)))
    right.set_xticklabels([r["variant"] for r in others], rotation=20, ha="right", fontsize=8)
    right.set_title(f"paired Δ vs {rows[0]['variant']} (95% CI)", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
