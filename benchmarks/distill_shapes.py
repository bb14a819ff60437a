"""What manifold distillation buys on shapes-cls: the student of recipes/distill-shapes.yaml trained
three ways, several seeds each, and the cost of one training step of each, side by side.

    python benchmarks/distill_shapes.py [--epochs N] [--seeds 0 1 2] [--quick] [--results docs/results.md]

Variants (same student, data, optimiser, schedule and seed; only the loss differs):
  plain     classification of the student alone: CE on the labels (task classification)
  kd        (1 - alpha) CE + alpha KD from the teacher, no relation terms (distill.beta = 0)
  manifold  kd + beta x the patch / sample / random relation losses on the recipe's layer pairs

The teacher is the run of recipes/cls-shapes.yaml at --teacher (default runs/classification/cls-shapes);
it is trained first when missing. Top-1 is the last epoch's validation accuracy (no EMA), reported as
mean ± sample standard deviation over seeds, and min-max.

Step time: one fixed batch of train.batch_size images; a step is the task's loss (teacher forward
included), backward and an AdamW update. The three variants run in turn (plain, kd, manifold,
plain, ...) after warm-up steps, so a slower or busier machine slows all of them alike; the median
per variant is reported, and the manifold / kd ratio (goal: <= 1.15).

The full run writes the "## Distillation (shapes-cls)" section of --results (other sections are
kept). --quick trains on a small generated copy of shapes-cls (16 train / 8 val images per class)
with a 1-epoch teacher, batch 16 and seeds 0 1, to check the whole pipeline in about a minute;
it writes --results only when the flag is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.markdown import write_section  # noqa: E402
from dfx.data.embedded import generate_shapes_cls  # noqa: E402
from dfx.engine import train  # noqa: E402
from dfx.engine.checkpoint import read_metadata  # noqa: E402
from dfx.engine.trainer import build_optimizer, seed_everything  # noqa: E402
from dfx.recipe import apply_overrides, build_recipe, load_tree, task_module  # noqa: E402

RECIPE = REPO / "recipes" / "distill-shapes.yaml"
TEACHER_RECIPE = REPO / "recipes" / "cls-shapes.yaml"
SECTION = "## Distillation (shapes-cls)"
VARIANTS = ("plain", "kd", "manifold")
LABELS = {"plain": "student alone (CE)", "kd": "+ KD", "manifold": "+ KD + manifold"}


def variant_recipe(variant: str, teacher: Path, overrides: list[str], name: str):
    """The distill-shapes recipe as one of the three variants (a validated Recipe)."""
    tree = apply_overrides(load_tree(RECIPE), [f"distill.teacher={teacher}", *overrides])
    if variant == "plain":
        tree = {key: value for key, value in tree.items() if key != "distill"}
        tree["task"] = "classification"
    elif variant == "kd":
        tree["distill"]["beta"] = 0.0
    return build_recipe(tree, name=name, source=str(RECIPE))


def ensure_teacher(path: Path, overrides: list[str]) -> Path:
    if (path / "checkpoints" / "best.safetensors").is_file():
        return path
    print(f"teacher {path} not found: training it (dfx train {TEACHER_RECIPE.relative_to(REPO)})", flush=True)
    result = train(TEACHER_RECIPE, overrides, out=path, quiet=True)
    print(f"teacher: top-1 {result['metrics']['top1']:.4f} in {result['elapsed_s']:.0f} s", flush=True)
    return path


def step_times(teacher: Path, overrides: list[str], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per training step of each variant, measured in turn on one fixed batch."""
    steps = {}
    for variant in VARIANTS:
        recipe = variant_recipe(variant, teacher, overrides, f"timing-{variant}")
        task = task_module(recipe.task).Task(recipe)
        dataset = task.dataset("train")
        seed_everything(0)
        model = task.build_model().train()
        optimizer = build_optimizer(model, task, recipe.train)
        batch = (torch.stack([dataset[i][0] for i in range(recipe.train.batch_size)]),
                 torch.tensor([dataset[i][1] for i in range(recipe.train.batch_size)]))
        steps[variant] = (task, model, optimizer, batch)

    def one_step(task, model, optimizer, batch) -> float:
        started = time.perf_counter()
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_index in range(warmup + repeats):
        for variant in VARIANTS:
            elapsed = one_step(*steps[variant])
            if round_index >= warmup:
                times[variant].append(elapsed)
    return {variant: statistics.median(values) for variant, values in times.items()}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def report(top1: dict, seconds: dict, step: dict, teacher_top1: float, args, recipe) -> str:
    ratio = step["manifold"] / step["kd"]
    lines = [
        SECTION,
        "",
        f"`python benchmarks/distill_shapes.py{' --quick' if args.quick else ''}`: the student of "
        f"`recipes/distill-shapes.yaml` ({recipe.model.name}, depth {recipe.model.kwargs.get('depth')}, width "
        f"{recipe.model.kwargs.get('embed_dim')}, random init) on shapes-cls, "
        f"{args.epochs} epoch(s), seeds {' '.join(map(str, args.seeds))}; teacher `{args.teacher}` "
        f"(recipes/cls-shapes.yaml) at {100 * teacher_top1:.1f}% top-1. "
        f"KD: alpha {recipe.distill.alpha}, tau {recipe.distill.tau}; manifold: beta {recipe.distill.beta}, "
        f"w_sample {recipe.distill.w_sample}, w_patch {recipe.distill.w_patch}, w_rand {recipe.distill.w_rand}, "
        f"K {recipe.distill.k}, student blocks {recipe.distill.student_layers} <-> teacher blocks "
        f"{recipe.distill.teacher_layers}.",
        "",
        "| student trained with | top-1 % (mean ± std (min-max)) | step ms | step / KD step | run s |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        lines.append(f"| {LABELS[variant]} | {spread(top1[variant])} | {1000 * step[variant]:.1f} | "
                     f"{step[variant] / step['kd']:.2f} | {statistics.mean(seconds[variant]):.0f} |")
    lines += [
        "",
        f"Step: batch {recipe.train.batch_size}, loss (teacher forward included) + backward + AdamW update, "
        f"median of {args.repeats} steps per variant run in turn, {torch.get_num_threads()} CPU thread(s), "
        f"torch {torch.__version__}. KD + manifold step / KD step = **{ratio:.2f}** (goal <= 1.15). "
        "Top-1: last-epoch validation accuracy; run s: wall time of one training run (data loading and "
        "evaluation included).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per student run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0 1)")
    parser.add_argument("--teacher", type=Path, default=Path("runs/classification/cls-shapes"))
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--quick", action="store_true", help="small data, 1 epoch: a check that runs in about a minute")
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown file to write the section into (default docs/results.md; none with --quick)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])

    with tempfile.TemporaryDirectory(prefix="distill-shapes-") as scratch:
        scratch = Path(scratch)
        overrides, teacher_overrides = [], []
        if args.quick:
            generate_shapes_cls(scratch / "data", seed=0, train_per_class=16, val_per_class=8)
            overrides = [f"data.root={scratch / 'data'}", "train.num_workers=0", "train.batch_size=16"]
            teacher_overrides = [*overrides, "train.epochs=1"]
            args.epochs = args.epochs or 1
            args.repeats = min(args.repeats, 5)
            if args.teacher == parser.get_default("teacher"):
                args.teacher = scratch / "teacher"
        results = args.results or (None if args.quick else REPO / "docs" / "results.md")
        base = variant_recipe("manifold", args.teacher, overrides, "distill-shapes")
        args.epochs = args.epochs or base.train.epochs
        overrides += [f"train.epochs={args.epochs}", f"eval.every={args.epochs}"]  # evaluate the last epoch only

        teacher = ensure_teacher(args.teacher, teacher_overrides)
        teacher_top1 = read_metadata(teacher / "checkpoints" / "best.safetensors")["metrics"]["top1"]
        step = step_times(teacher, overrides, warmup=3, repeats=args.repeats)
        print("step ms: " + ", ".join(f"{v} {1000 * s:.1f}" for v, s in step.items())
              + f"; manifold / kd {step['manifold'] / step['kd']:.2f}", flush=True)

        top1 = {v: [] for v in VARIANTS}
        seconds = {v: [] for v in VARIANTS}
        for seed in args.seeds:
            for variant in VARIANTS:
                recipe = variant_recipe(variant, teacher, [*overrides, f"train.seed={seed}"], f"{variant}-{seed}")
                result = train(recipe, out=scratch / "runs" / f"{variant}-seed{seed}", quiet=True)
                top1[variant].append(result["metrics"]["top1"])
                seconds[variant].append(result["elapsed_s"])
                print(f"seed {seed} {variant:8s} top-1 {result['metrics']['top1']:.4f} "
                      f"({result['elapsed_s']:.0f} s)", flush=True)

        section = report(top1, seconds, step, teacher_top1, args, base)
    print()
    print(section)
    if results is not None:
        write_section(results, section)
        print(f"wrote {SECTION!r} into {results}")


if __name__ == "__main__":
    main()
