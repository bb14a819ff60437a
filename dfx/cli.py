"""The ``dfx`` command line: parse, call one engine function, print.

``--json`` prints exactly one JSON object on stdout (also on failure: ``{"error", "exit_code"}``);
progress and logs go to stderr. Exit codes: 0 success, 1 a run that failed, 2 bad usage or recipe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import dfx
from dfx.errors import DfxError, Terminated, UsageError, note_sigterm, rank_label, reset_sigterm, sigterm_received
from dfx.log import log_to_stderr, logger

try:  # Typer's command-line parse errors (it ships its own copy of click)
    from typer._click.exceptions import NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ParseError
except ImportError:  # older Typer runs on click itself
    from click.exceptions import NoArgsIsHelpError
    from click.exceptions import UsageError as ParseError

app = typer.Typer(
    name="dfx",
    help="Efficient vision transformers for dense prediction: train, evaluate and benchmark from YAML recipes.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)

JSON_HELP = "Print exactly one JSON object on stdout; logs go to stderr."
DEBUG_HELP = "Show the full traceback on errors."
DEVICE_HELP = "auto, cpu, cuda or cuda:N."


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:1") if d.startswith(incomplete)]


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def _complete_fusion(incomplete: str) -> list[str]:
    from dfx.fusion.strategies import FUSIONS

    return [f for f in FUSIONS if f.startswith(incomplete)]


# The options most commands share, declared once.
JsonOption = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
DebugOption = Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
DeviceOption = Annotated[str, typer.Option("--device", help=DEVICE_HELP, autocompletion=_complete_device)]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")]
WEIGHTS_HELP = "A run directory, a dfx checkpoint, or a recipe with model.weights=FILE among the overrides."
CLUSTER_RATIO_HELP = "Expedit token clustering: share of the patch tokens kept after block L, in (0, 1]."
ALPHA_HELP = "Blocks run at full resolution before clustering, 1..depth (default 40% of the depth)."


def _version(value: bool) -> None:
    if value:
        print(f"dfx {dfx.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """dfx: H-DETR, GeminiFusion, Expedit token clustering and manifold distillation in one toolkit."""


def _one_line(error: BaseException) -> str:
    """The user-facing line of an error (data-loader workers wrap errors in a traceback text)."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(("dfx.errors.", "UsageError", "RunError")) else last
    return text.splitlines()[0] if text else type(error).__name__


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _on_sigterm(signum, frame) -> None:
    note_sigterm()
    raise Terminated


def handle_sigterm() -> None:
    """Stop on SIGTERM as on SIGINT: the current step is discarded, the run directory keeps its
    last committed epoch, and the error/JSON contract holds (exit 143)."""
    reset_sigterm()
    signal.signal(signal.SIGTERM, _on_sigterm)


TRAIN_RESUME = "a training run keeps its last completed epoch (continue it with `dfx train RECIPE --resume`)"
COMPARE_RESUME = "finished runs are kept; repeat the same dfx compare command to resume the comparison"


def _interrupted(error: KeyboardInterrupt, resume: str = TRAIN_RESUME) -> tuple[int, str]:
    """Exit code (128 + signal number) and message for SIGINT/SIGTERM; ``resume`` says how to go on."""
    signal_name = "SIGTERM" if isinstance(error, Terminated) else "SIGINT"
    return 128 + getattr(signal, signal_name), f"interrupted by {signal_name}; {resume}"


def report(message: str, code: int, json_out: bool) -> None:
    """Print an error: one plain-text line on stderr (never read as markup) and, under --json,
    exactly one JSON object on stdout."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    if json_out:
        print(json.dumps({"error": message, "exit_code": code}), flush=True)


def run(work: Callable[[], dict], *, json_out: bool, debug: bool, show: Callable[[dict], None],
        quiet: bool = False, resume: str = TRAIN_RESUME) -> None:
    """Call ``work`` and print its result; turn errors into a line and an exit code.

    dfx's log records go to stderr, warnings and errors only with ``--quiet``.
    """
    log_to_stderr(quiet=quiet, debug=debug)
    try:
        result = work()
    except DfxError as e:
        if debug:
            traceback.print_exc()
        code, message = e.exit_code, _one_line(e)
    except KeyboardInterrupt as e:
        code, message = _interrupted(e, resume)
    except Exception as e:  # a bug or an unexpected library error
        if debug:
            traceback.print_exc()
        if sigterm_received():  # the SIGTERM landed in library code that wrapped it (or killed a worker)
            code, message = _interrupted(Terminated(), resume)
        elif "dfx.errors.UsageError" in str(e):  # raised in a data-loader worker, re-raised wrapped
            code, message = 2, _one_line(e)
        else:
            hint = "" if debug else " (run with --debug for the traceback)"
            code, message = 1, f"{type(e).__name__}: {_one_line(e)}{hint}"
    else:
        if _is_main_process():
            if json_out:
                print(json.dumps(result, default=str))
            else:
                show(result)
        return
    message = rank_label() + message
    if os.environ.get("DFX_ERROR_DIR"):  # a rank of `--nproc-per-node`: the launcher reports the first failure
        from dfx.engine.distributed import record_failure

        record_failure(message, code)
    elif _is_main_process():
        report(message, code, json_out)
    else:  # torchrun started by hand: every failing rank says why on stderr
        report(message, code, json_out=False)
    raise typer.Exit(code)


def _metrics_table(title: str, metrics: dict) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _show_run(result: dict, dry_run: bool, detail: str = "") -> None:
    """Human output of train/distill: the resolved recipe (dry run) or the run's summary."""
    if dry_run:
        import yaml

        out.print(yaml.safe_dump(result, sort_keys=False), end="", highlight=False)
        return
    stopped = ", stopped early: train.patience" if result.get("stopped_early") else ""
    out.print(f"run directory: {result['run_dir']}  ({detail}{result['epochs']} epochs{stopped}, "
              f"{result['elapsed_s']:.0f} s)", markup=False)
    out.print(_metrics_table("final metrics", result["metrics"]))
    if result["best"]:
        out.print(f"best (epoch {result['best']['epoch']}) saved as checkpoints/best.safetensors")


def _resume_flag(argv: list[str]) -> list[str]:
    """``--resume`` takes an optional RUN: bare ``--resume`` means the latest run of the recipe."""
    fixed = []
    for i, arg in enumerate(argv):
        if arg == "--resume":
            following = argv[i + 1] if i + 1 < len(argv) else None
            if (following is None or following.startswith("-") or following.endswith((".yaml", ".yml"))
                    or ("=" in following and not Path(following).exists())):
                arg = "--resume=latest"
        fixed.append(arg)
    return fixed


def _seeds_list(argv: list[str]) -> list[str]:
    """``--seeds 0 1 2`` (several values after one flag) becomes ``--seeds=0,1,2``."""
    fixed, i = [], 0
    while i < len(argv):
        if argv[i] == "--seeds":
            values = []
            while i + 1 < len(argv) and argv[i + 1].replace(",", "").replace("-", "").isdigit():
                values.append(argv[i + 1])
                i += 1
            fixed.append("--seeds=" + ",".join(values) if values else "--seeds")
        else:
            fixed.append(argv[i])
        i += 1
    return fixed


MAX_SEEDS = 10_000  # each seed is a training run per variant: more is a typo


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-7"`` (inclusive) or a mix, as a list of seeds."""
    seeds = []
    for part in filter(None, text.replace(" ", ",").split(",")):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise UsageError(f"--seeds: {part!r} is not a seed or a range like 0-7")
        if dash and int(high) < int(low):
            raise UsageError(f"--seeds: the range {part} is empty (it ends below its start); write it as "
                             f"{high}-{low}")
        count = len(seeds) + (int(high) - int(low) + 1 if dash else 1)
        if count > MAX_SEEDS:
            raise UsageError(f"--seeds: {part} makes {count} seeds (one training run per variant each); "
                             f"at most {MAX_SEEDS}")
        seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    return seeds


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file or shipped recipe name (dfx recipes), e.g. cls-shapes."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides: section.key=value ..."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<task>/<recipe>[-N])."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="[RUN]",
                                         help="Continue the latest run of this recipe, or RUN, from its last checkpoint."),
    device: DeviceOption = "auto",
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Launch N processes on this node with torchrun."),
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Train a model from a YAML recipe.

    Examples:

      dfx train recipes/hdetr-shapes.yaml

      dfx train recipes/cls-shapes.yaml train.epochs=30 train.lr=1e-3 --resume

      dfx train recipes/hdetr.yaml data.root=/data/coco --nproc-per-node 8
    """
    overrides = overrides or []
    if nproc_per_node > 1 and "RANK" not in os.environ and not dry_run:
        from dfx.engine.distributed import launch

        argv = sys.argv[1:]
        drop = {"--nproc-per-node"}
        rest = [a for i, a in enumerate(argv) if a not in drop and not a.startswith("--nproc-per-node=")
                and (i == 0 or argv[i - 1] not in drop)]
        code, failure = launch(nproc_per_node, rest)
        if failure is not None:
            report(failure["error"], failure["exit_code"], json_out)
            code = failure["exit_code"]
        elif code:
            report(f"torchrun exited with code {code} (see its messages above)", code, json_out)
        raise typer.Exit(code)

    def work() -> dict:
        if dry_run:
            from dfx.engine.trainer import resolve_run

            resolved, _ = resolve_run(recipe, overrides, resume)
            return resolved.to_dict()
        from dfx.engine import train as train_recipe

        return train_recipe(recipe, overrides, out=out_dir, resume=resume, device=device, quiet=quiet)

    run(work, json_out=json_out, debug=debug, quiet=quiet, show=lambda result: _show_run(result, dry_run))


def _sigmas(text: Optional[str]) -> Optional[list]:
    """--sigmas "0.05,0.06,..." as floats (None when not given)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--sigmas: {text!r} is not a comma-separated list of numbers (e.g. 0.05,0.06)") from None


@app.command("eval")
def eval_(
    run_or_checkpoint: Optional[Path] = typer.Argument(None, metavar="[RUN_DIR|CHECKPOINT|RECIPE]",
                                                       help="A run directory, a .safetensors checkpoint, or a recipe "
                                                            "with model.weights=FILE among the overrides."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides, e.g. data.root=path/to/data."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluate on this data (sets data.root)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", metavar="FILE",
                                               help="A COCO results JSON from any detector: evaluate it against "
                                                    "--annotations instead of running a model."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", metavar="FILE",
                                               help="The COCO annotation JSON --predictions are scored against."),
    strict: bool = typer.Option(False, "--strict", help="--predictions: an empty results list is an error (exit 2) "
                                                        "instead of a warning."),
    sigmas: Optional[str] = typer.Option(None, "--sigmas", metavar="S1,S2,...",
                                         help="--predictions with keypoints: the per-keypoint OKS sigmas (default: "
                                              "the annotations' category 'sigmas', else COCO's 17)."),
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Evaluate a trained run (best checkpoint), a checkpoint file or a recipe's model.weights on validation
    data, or a COCO results file (--predictions FILE --annotations FILE).

    Examples:

      dfx eval runs/detection/hdetr-shapes --json

      dfx eval recipes/hdetr.yaml model.weights=h_deformable_detr_r50.pth data.root=/data/coco

      dfx eval --predictions results.json --annotations instances_val2017.json
    """
    extra = list(overrides or []) + ([f"data.root={data}"] if data else [])

    def work() -> dict:
        if predictions is not None or annotations is not None:
            if predictions is None or annotations is None:
                raise UsageError("--predictions and --annotations go together: a COCO results JSON and the COCO "
                                 "annotation JSON it is scored against")
            if run_or_checkpoint is not None or extra:
                raise UsageError("--predictions evaluates a results file: drop the run directory / overrides")
            from dfx.data.coco_eval import evaluate_results_file

            return evaluate_results_file(predictions, annotations, strict, _sigmas(sigmas))
        if run_or_checkpoint is None:
            raise UsageError("dfx eval needs a run directory or checkpoint, or --predictions FILE --annotations FILE")
        from dfx.engine import evaluate_checkpoint

        return evaluate_checkpoint(run_or_checkpoint, extra, device=device, progress=not (quiet or json_out))

    def show(result: dict) -> None:
        epoch = f" (epoch {result['epoch']})" if result.get("epoch") is not None else ""
        title = (f"{Path(result['predictions']).name} ({result['detections']} {result['iou_type']} results on "
                 f"{result['images']} images)"
                 if "detections" in result else f"{result['checkpoint']}{epoch}")
        out.print(_metrics_table(escape(title), result["metrics"]))
        if result.get("no_ground_truth"):
            out.print(f"no ground truth (no per-class AP): {', '.join(result['no_ground_truth'])}", markup=False,
                      highlight=False)
        if "detections" not in result:
            _print_files(result, ("predictions", "annotations", "pr_curve", "picture"))

    run(work, json_out=json_out, debug=debug, quiet=quiet, show=show)


data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    target: Optional[str] = typer.Argument(None, metavar="[RECIPE|ROOT]",
                                           help="A detection recipe, or a dataset folder / YOLO data.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides, e.g. data.skip_invalid=true."),
    no_decode: bool = typer.Option(False, "--no-decode", help="Do not decode every image (faster on large data; "
                                                              "finds missing and non-image files only)."),
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Read a detection dataset the way training will: format, splits, boxes per class, image sizes and
    every problem (exit 1 when training would fail). Depth data (a depth recipe, or ROOT task=depth):
    pairs, valid fraction, depth range and a unit guess.

    Examples:

      dfx data check ../shared/data/chess-pieces-coco

      dfx data check recipes/hdetr.yaml data.root=/data/coco --json

      dfx data check recipes/dpt-nyu.yaml data.root=/data/nyu
    """
    items = list(overrides or [])
    if target is not None and "=" in target and not Path(target).exists():  # only overrides given
        items.insert(0, target)
        target = None
    report: dict = {}

    def work() -> dict:
        from dfx.data_check import check_data

        report.update(check_data(target, items, decode=not no_decode, progress=not (quiet or json_out)))
        if not report["ok"]:  # the JSON of a failing check says so as every failing command does
            fatal = next(p for p in report["problems"] if p["fatal"])
            report.update(error=f"{fatal['split']}: {fatal['detail']}", exit_code=1)
        return report

    run(work, json_out=json_out, debug=debug, quiet=quiet, show=_show_data_report)
    if report and not report["ok"]:
        raise typer.Exit(1)


def _show_data_report(report: dict) -> None:
    if report.get("task") == "depth":
        from dfx.data.depth_check import report_lines

        for line in report_lines(report):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        for problem in report["problems"]:
            level = "[bold red]error[/]" if problem["fatal"] else "[yellow]warning[/]"
            out.print(f"{level} {problem['split']}: {escape(problem['detail'])}", highlight=False, soft_wrap=True)
        out.print("ok: training can read this data" if report["ok"] else "[bold red]training would fail on this data[/]",
                  highlight=False)
        return
    out.print(f"{report['root'] or 'explicit paths'}: format {report['format']}, {len(report['classes'])} classes",
              highlight=False)
    table = Table(show_header=True)
    table.add_column("class")
    splits = list(report["splits"])
    for split in splits:
        table.add_column(split, justify="right")
    for name in report["classes"]:
        table.add_row(name, *(str(report["splits"][s]["boxes_per_class"].get(name, 0)) for s in splits))
    table.add_row("[bold]boxes", *(str(report["splits"][s]["boxes"]) for s in splits))
    table.add_row("[bold]images", *(str(report["splits"][s]["images"]) for s in splits))
    if any("keypoints" in report["splits"][s] for s in splits):  # pose data: labelled keypoints and visibility
        points = [report["splits"][s].get("keypoints") or {} for s in splits]
        table.add_row("[bold]keypoints / instance", *(str(p.get("per_instance", "-")) for p in points))
        table.add_row("[bold]visibility 0 / 1 / 2", *(" / ".join(str(v) for v in p["visibility"].values())
                                                      if p else "-" for p in points))
    table.add_row("[bold]image sizes", *(", ".join(f"{k} ({n})" for k, n in report["splits"][s]["image_sizes"].items())
                                         for s in splits))
    out.print(table)
    for problem in report["problems"]:
        level = "[bold red]error[/]" if problem["fatal"] else "[yellow]warning[/]"
        out.print(f"{level} {problem['split']}: {problem['detail']}", highlight=False, soft_wrap=True)
    out.print("ok: training can read this data" if report["ok"] else
              "[bold red]training would fail on this data[/] (see the errors above)", highlight=False)


@app.command()
def bench(
    model: str = typer.Option("vit_base_patch16_224", "--model", help="timm model name or alias, recipe, run dir or checkpoint."),
    batch: int = typer.Option(1, "--batch", help="Batch size."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Square input size (default: the model's)."),
    warmup: int = typer.Option(5, "--warmup", help="Unmeasured passes first."),
    repeats: int = typer.Option(20, "--repeats", help="Measured passes."),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Weights and inputs in this type."),
    cluster_ratio: Optional[float] = typer.Option(None, "--cluster-ratio", metavar="R",
                                                  help=CLUSTER_RATIO_HELP + " Measures baseline and clustered side by "
                                                       "side."),
    alpha: Optional[int] = typer.Option(None, "--alpha", metavar="L", help=ALPHA_HELP),
    device: DeviceOption = "auto",
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Measure inference latency, throughput, parameters, GFLOPs and peak memory.

    Examples:

      dfx bench --model vit_base_patch16_224 --batch 8

      dfx bench --model vit_large_patch16_384 --cluster-ratio 0.5

      dfx bench --model runs/detection/hdetr-shapes --json
    """

    def work() -> dict:
        from dfx.bench import bench as run_bench

        return run_bench(model, batch=batch, image_size=image_size, warmup=warmup, repeats=repeats,
                         device=device, dtype=dtype.value, cluster_ratio=cluster_ratio, alpha=alpha)

    def show(result: dict) -> None:
        title = f"{result['model']} @ {result['image_size']}px, batch {result['batch']}"
        if "clustered" in result:
            out.print(_side_by_side(f"{title}, cluster ratio {result['settings']['cluster_ratio']}", result,
                                    ("latency_ms", "throughput", "gflops", "peak_mem_mb")))
            out.print(f"speedup {result['speedup']:.3f}x, FLOPs ratio {result['flops_ratio']:.3f}x, efficiency "
                      f"{result['efficiency']:.3f}; clustering + reconstruction take "
                      f"{100 * result['cluster_share']:.1f}% of the clustered latency", highlight=False)
            return
        out.print(_metrics_table(title, result))

    run(work, json_out=json_out, debug=debug, show=show)


def _print_files(result: dict, keys) -> None:
    for key in keys:
        if key in result:
            out.print(f"{key}: {result[key]}", markup=False, highlight=False)


def _modality_options(items: Optional[List[str]]) -> list[tuple[str, str]]:
    """``--modality NAME=SOURCE`` values as (name, source) pairs."""
    pairs = []
    for item in items or []:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise UsageError(f"--modality {item!r}: expected NAME=SOURCE, e.g. --modality depth=scans/")
        pairs.append((name, source))
    return pairs


def _side_by_side(title: str, result: dict, keys) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("")
    table.add_column("baseline", justify="right")
    table.add_column("clustered", justify="right")
    for key in keys:
        if key in result["baseline"]:
            table.add_row(key, *(f"{result[side][key]:.4g}" for side in ("baseline", "clustered")))
    return table


@app.command()
def cluster(
    run_dir: Optional[str] = typer.Argument(None, metavar="[RUN]", help="A dfx run directory or checkpoint "
                                            "(segmentation, depth or detection run), the same as --model."),
    model: Optional[str] = typer.Option(None, "--model", metavar="NAME|RUN_DIR",
                                        help="A dfx run directory or checkpoint (trained), or a timm ViT or Swin name "
                                             "(random weights)."),
    cluster_ratio: float = typer.Option(0.5, "--cluster-ratio", metavar="R", help=CLUSTER_RATIO_HELP),
    clusters: Optional[str] = typer.Option(None, "--clusters", metavar="HxW",
                                           help="A fixed grid of centres in place of --cluster-ratio (a Swin: SxS per "
                                                "window)."),
    alpha: Optional[int] = typer.Option(None, "--alpha", metavar="L", help=ALPHA_HELP),
    data: Optional[str] = typer.Option(None, "--data", help="Data root or embedded dataset (default: the run's "
                                                            "validation data; shapes-seg for a timm name)."),
    images: int = typer.Option(8, "--images", help="Validation images the feature fidelity is measured on."),
    batch: int = typer.Option(1, "--batch", help="Batch size of the latency measurement."),
    warmup: int = typer.Option(2, "--warmup", help="Unmeasured passes of each model first."),
    repeats: int = typer.Option(10, "--repeats", help="Measured passes of each model (alternating)."),
    window: int = typer.Option(5, "--window", help="Clustering window (odd; at most the clustered grid's side)."),
    iters: int = typer.Option(5, "--iters", help="Clustering iterations."),
    temperature: str = typer.Option("auto", "--temperature", metavar="T|auto",
                                    help="Clustering and reconstruction temperature; auto calibrates it to the "
                                         "model's feature scale (0.02 is the paper's value for Segmenter ViT-L)."),
    k: int = typer.Option(20, "--k", help="Clusters each token is reconstructed from."),
    no_metric: bool = typer.Option(False, "--no-metric", help="Skip the task metric on the validation split."),
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Accelerate a ViT with Expedit token clustering (no training) and measure what changes.

    Examples:

      dfx cluster --model runs/segmentation/segmenter-shapes --cluster-ratio 0.5

      dfx cluster --model vit_base_patch16_384 --cluster-ratio 0.25 --json

      dfx cluster runs/depth/dpt-shapes-expedit --alpha 2 --clusters 8x8
    """

    def work() -> dict:
        from dfx.cluster_report import cluster_report, parse_clusters

        if (run_dir is None) == (model is None):
            raise UsageError("dfx cluster: give the model once, as RUN or as --model NAME|RUN_DIR")
        return cluster_report(run_dir or model, cluster_ratio=cluster_ratio, alpha=alpha, data=data, images=images,
                              batch=batch, warmup=warmup, repeats=repeats, device=device, iters=iters,
                              temperature=_temperature(temperature), clusters=parse_clusters(clusters),
                              window=window, k=k, metric=not no_metric, progress=not (quiet or json_out))

    def show(result: dict) -> None:
        settings = result["settings"]
        title = (f"{result['model']} @ {result['image_size']}px: {result['grid'][0]}x{result['grid'][1]} -> "
                 f"{result['clustered_grid'][0]}x{result['clustered_grid'][1]} tokens after block "
                 f"{settings['alpha']} of {settings['depth']}")
        metrics = list(result.get("metric_drops", {}))
        out.print(_side_by_side(title, result, ["latency_ms", "gflops", *metrics]))
        backbones = {side: result[side]["backbone"] for side in ("baseline", "clustered")}
        out.print(_side_by_side("backbone alone", backbones, ["latency_ms", "gflops"]))
        out.print(f"backbone speedup {result['backbone_speedup']:.3f}x (FLOPs ratio "
                  f"{result['backbone_flops_ratio']:.3f}x)", highlight=False)
        fidelity = result["fidelity"]
        out.print(f"speedup {result['speedup']:.3f}x (FLOPs ratio {result['flops_ratio']:.3f}x); feature cosine "
                  f"similarity mean {fidelity['cosine_mean']:.4f}, min {fidelity['cosine_min']:.4f} over "
                  f"{fidelity['tokens']} tokens ({result['weights']} weights)", highlight=False)
        assignment = result["assignment"]
        out.print(f"assignment sharpness {assignment['sharpness']:.3g} (temperature {settings['temperature']} x squared "
                  f"token-centre distance {assignment['distance']:.3g}; well below 1: blurred)", highlight=False)
        for name, drop in result.get("metric_drops", {}).items():
            out.print(f"{name} drop: {drop:.2f} points (x100, positive = worse)", highlight=False)

    run(work, json_out=json_out, debug=debug, quiet=quiet, show=show)


def _temperature(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--temperature: expected a number >= 0 or 'auto', got {text!r}") from None


def _fetch_hub_teacher(recipe: Path, overrides: list[str], teacher: Optional[str]) -> None:
    """Fetch an alias or hf:// teacher before the training stack is imported (torchvision and timm
    take seconds to import), so a machine without network or cached weights fails in seconds."""
    from dfx import hub
    from dfx.recipe import apply_overrides, load_tree

    section = apply_overrides(load_tree(recipe), overrides).get("distill")
    spec = teacher or (section.get("teacher") if isinstance(section, dict) else None)
    if isinstance(spec, str) and (spec in hub.ALIASES or spec.startswith("hf://")):
        hub.resolve(spec)


@app.command()
def distill(
    recipe: Optional[Path] = typer.Argument(None, help="Distillation recipe (default the shipped distill-shapes)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides: section.key=value ..."),
    teacher: Optional[str] = typer.Option(None, "--teacher", metavar="NAME|PATH|RUN_DIR",
                                          help="Teacher: alias (deit-b, cait-s24), timm name, hf://org/repo, "
                                               "weights file or dfx run directory (sets distill.teacher)."),
    student: Optional[str] = typer.Option(None, "--student", metavar="NAME",
                                          help="Student timm model name (sets model.name)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/distillation/<recipe>)."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="[RUN]",
                                         help="Continue the latest run of this recipe, or RUN, from its last "
                                              "checkpoint."),
    device: DeviceOption = "auto",
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Distil a teacher ViT into a smaller student with KD and manifold relation losses.

    Examples:

      dfx distill

      dfx distill recipes/distill-deit-tiny.yaml --teacher deit-b data.root=/data/imagenet
    """
    overrides = list(overrides or [])
    if recipe is not None and "=" in str(recipe) and not recipe.is_file():  # no RECIPE given, only overrides
        overrides.insert(0, str(recipe))
        recipe = None
    recipe = recipe or Path("recipes/distill-shapes.yaml")  # runs anywhere: embedded data, a teacher made in minutes

    def work() -> dict:
        if not (dry_run or resume):
            _fetch_hub_teacher(recipe, overrides, teacher)
        from dfx.tasks.distillation import distill as run_distill

        return run_distill(recipe, overrides, teacher=teacher, student=student, out=out_dir, resume=resume,
                           device=device, quiet=quiet, dry_run=dry_run)

    run(work, json_out=json_out, debug=debug, quiet=quiet,
        show=lambda result: _show_run(result, dry_run, f"teacher {result.get('teacher')}, "))


@app.command()
def fuse(
    recipe: Path = typer.Argument(..., help="Fusion recipe file or shipped recipe name, e.g. gemini-shapes."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides: section.key=value ..."),
    fusion: Optional[str] = typer.Option(None, "--fusion", metavar="[gemini|cross-attn|exchange|concat|none]",
                                         autocompletion=_complete_fusion, help="The fusion strategy (sets model.fusion)."),
    compare: Optional[str] = typer.Option(None, "--compare", metavar="LIST",
                                          help="Train each listed strategy (comma-separated) with the same data, "
                                               "seed and schedule; print and save a table."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/fusion/<recipe>[-N])."),
    device: DeviceOption = "auto",
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Train and evaluate multi-modal segmentation (GeminiFusion), or compare fusion strategies.

    Examples:

      dfx fuse recipes/gemini-shapes.yaml

      dfx fuse recipes/gemini-shapes.yaml --compare none,concat,exchange,cross-attn,gemini

      dfx fuse recipes/gemini-nyudv2-mitb3.yaml data.root=~/data/nyudv2 model.pretrained=mit_b3.pth
    """
    overrides = list(overrides or [])

    def work() -> dict:
        from dfx.tasks import fusion as fusion_task

        if compare is not None:
            if fusion is not None or dry_run:
                raise UsageError("--compare trains the listed strategies; it cannot be combined with --fusion or "
                                 "--dry-run")
            return _compare_strategies(recipe, compare, overrides, out_dir, device, quiet or json_out)
        return fusion_task.fuse(recipe, overrides, fusion=fusion, out=out_dir, device=device, quiet=quiet,
                                dry_run=dry_run)

    def show(result: dict) -> None:
        if "rows" not in result:
            _show_run(result, dry_run, "" if dry_run else f"fusion {result['fusion']}, ")
            return
        _show_compare(result)

    run(work, json_out=json_out, debug=debug, quiet=quiet, show=show,
        resume=COMPARE_RESUME if compare is not None else TRAIN_RESUME)


@app.command()
def compare(
    variants: List[str] = typer.Argument(..., metavar="VARIANT...",
                                         help="RECIPE.yaml[:key=value…] per variant, or a YAML list of named "
                                              "variants; bare key=value applies to every variant."),
    seeds: str = typer.Option("0", "--seeds", metavar="S...", help="Seeds: --seeds 0 1 2, 0,1,2 or 0-7."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Runs trained at once (the CPU threads are shared out)."),
    name: Optional[str] = typer.Option(None, "--name", help="Comparison name (default: the recipes' stems)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Comparison folder (default runs/compare/<name>)."),
    device: DeviceOption = "cpu",
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Train recipe variants over several seeds and compare them with paired confidence intervals.

    Examples:

      dfx compare recipes/deformable-detr-shapes.yaml recipes/hdetr-shapes.yaml --seeds 0-7 --jobs 2

      dfx compare recipes/hdetr-shapes.yaml recipes/hdetr-shapes.yaml:model.one2many_k=3 train.epochs=2

    Repeating the same command resumes an interrupted comparison; finished runs are not trained again.
    """
    specs = [v for v in variants if not _is_override(v)]
    common = [v for v in variants if v not in specs]

    def work() -> dict:
        from dfx.compare import compare as run_compare

        return run_compare(specs, common, seeds=parse_seeds(seeds), jobs=jobs, name=name, out=out_dir,
                           device=device, log=logger.info)

    run(work, json_out=json_out, debug=debug, quiet=quiet, show=_show_compare, resume=COMPARE_RESUME)


def _is_override(arg: str) -> bool:
    """``key=value`` (applies to every variant), not ``RECIPE[:key=value…]``."""
    key, sep, _ = arg.partition("=")
    return bool(sep) and ":" not in key and not key.endswith((".yaml", ".yml"))


def _show_compare(result: dict) -> None:
    from dfx.compare import markdown

    print(markdown(result))
    if result["readings"]:
        print("\n".join(result["readings"]))
    print(f"saved in {result['dir']}/compare.{{json,csv,md,png}}")


def _compare_strategies(recipe: Path, strategies: str, overrides: list[str], out_dir, device: str, quiet: bool):
    """``dfx fuse --compare``: dfx compare of one variant per strategy, on the recipe's seed."""
    from dfx.compare import Variant, compare
    from dfx.tasks import fusion as fusion_task

    names = fusion_task.strategies_of(strategies)
    seed = fusion_task.load_fusion_recipe(recipe, overrides).train.seed  # checks the recipe before any training
    variants = [Variant(name, str(recipe), [f"model.fusion={name}"]) for name in names]
    return compare(variants, overrides, seeds=[seed], name=f"{recipe.stem}-fusion", out=out_dir, device=device,
                   log=(lambda line: None) if quiet else logger.info)


@app.command()
def predict(
    weights: str = typer.Argument(..., metavar="WEIGHTS", help=WEIGHTS_HELP),
    sources: Optional[List[str]] = typer.Argument(None, metavar="SOURCE... [a.b=c ...]",
                                                  help="Image files, folders or globs (quote globs); recipe overrides "
                                                       "may follow."),
    modality: Optional[List[str]] = typer.Option(None, "--modality", metavar="NAME=SOURCE",
                                                 help="Fusion: the files of another modality, e.g. depth=scans/ "
                                                      "(SOURCE is the first of data.modalities)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/predict/<name>[-N])."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", metavar="FILE",
                                               help="Detection: number the COCO results by this annotation file's "
                                                    "image and category ids (default: the one beside the images, "
                                                    "e.g. _annotations.coco.json; else file order)."),
    conf: Optional[float] = typer.Option(None, "--conf", metavar="T",
                                         help="Detection: keep boxes scoring >= T (default 0.25). Segmentation: "
                                              "pixels below T get 255. Classification: list classes >= T."),
    batch: int = typer.Option(4, "--batch", help="Images per forward pass."),
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Run a trained model on images: pictures, COCO results / label maps and one JSON line per image.

    Examples:

      dfx predict runs/detection/hdetr-shapes photos/ --conf 0.3

      dfx predict runs/fusion/gemini-shapes rgb/ --modality depth=depth/
    """
    items = list(sources or [])
    overrides = [s for s in items if "=" in s and not Path(s).exists()]
    paths = [s for s in items if s not in overrides]

    def work() -> dict:
        from dfx.predict import predict as run_predict

        others: dict[str, list[str]] = {}
        for name, source in _modality_options(modality):
            others.setdefault(name, []).append(source)
        return run_predict(weights, paths, modalities=others, out=out_dir, conf=conf, batch=batch,
                           overrides=overrides, device=device, quiet=quiet or json_out, annotations=annotations)

    def show(result: dict) -> None:
        counts = f"{result['images']} images"
        if "detections" in result:
            counts += f", {result['detections']} detections (score >= {result['conf']:g})"
        if result["skipped"]:
            names = ", ".join(Path(s["file"]).name for s in result["skipped_files"][:5])
            counts += f"; skipped {result['skipped']} ({names}{', ...' if result['skipped'] > 5 else ''})"
        out.print(f"{counts} in {result['elapsed_s']:.1f} s -> {result['out']}", highlight=False)
        if "numbering" in result:
            out.print(f"ids: image_id = {result['numbering']['image_id']}; category_id = "
                      f"{result['numbering']['category_id']}", markup=False, highlight=False)
        _print_files(result, ("predictions", "segm_predictions", "results", "labels", "depth", "translations",
                              "pictures"))

    run(work, json_out=json_out, debug=debug, quiet=quiet, show=show)


@app.command()
def export(
    weights: str = typer.Argument(..., metavar="WEIGHTS", help=WEIGHTS_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides: section.key=value ..."),
    format: str = typer.Option("onnx", "--format", help="Output format: onnx."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Leave the batch size free in the graph."),
    image: Optional[Path] = typer.Option(None, "--image", help="A real image to trace with and check on (default: "
                                                               "seeded noise)."),
    modality: Optional[List[str]] = typer.Option(None, "--modality", metavar="NAME=FILE",
                                                 help="Fusion: the other modalities' files of --image."),
    image_size: Optional[List[int]] = typer.Option(None, "--image-size", metavar="S",
                                                   help="Input size, once (square) or twice (H then W); default "
                                                        "from the recipe."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="model.onnx file or folder (default "
                                                               "runs/export/<name>[-N]/model.onnx)."),
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Export a trained model to ONNX and check it with onnxruntime against PyTorch.

    Examples:

      dfx export runs/detection/hdetr-shapes --image photo.jpg

      dfx export runs/classification/cls-shapes --dynamic-batch --json
    """

    def work() -> dict:
        from dfx.export import export as run_export

        others = dict(_modality_options(modality))
        return run_export(weights, format=format, out=out_dir, dynamic_batch=dynamic_batch, image=image,
                          modalities=others, image_size=image_size, overrides=overrides or [])

    def show(result: dict) -> None:
        check = result["check"]
        shapes = ", ".join(f"{k} {v}" for k, v in result["inputs"].items())
        out.print(f"{result['file']} ({result['size_mb']:.1f} MB, opset {result['opset']}; inputs {shapes}"
                  f"{', batch dynamic' if result['dynamic_batch'] else ''})", highlight=False)
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in check["per_output"].items())
        out.print(f"onnxruntime vs PyTorch on {check['input']}: max |diff| {diffs} (tolerance {check['tolerance']:g}): "
                  f"{'ok' if check['passed'] else 'FAILED'}", highlight=False)

    run(work, json_out=json_out, debug=debug, show=show)


@app.command()
def recipes(
    folder: Optional[Path] = typer.Argument(None, metavar="[DIR]",
                                            help="List the recipes in DIR instead of the shipped ones; with --copy, "
                                                 "the folder to write into (default .)."),
    copy: Optional[str] = typer.Option(None, "--copy", metavar="NAME",
                                       help="Write shipped recipe NAME into DIR as a starting point for your own."),
    force: bool = typer.Option(False, "--force", help="With --copy: overwrite an existing file."),
    json_out: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List the shipped recipes (any command takes them by name) with their task and the first line
    of their header comment, or copy one out.

    Examples:

      dfx recipes

      dfx recipes --copy hdetr-shapes my-recipes/

      dfx recipes my-recipes/ --json
    """

    def work() -> dict:
        from dfx.recipe import copy_recipe, list_recipes

        if copy is not None:
            return copy_recipe(copy, folder or Path("."), force=force)
        if force:
            raise UsageError("--force goes with --copy NAME")
        return {"recipes": list_recipes(folder)}

    def show(result: dict) -> None:
        if "copied" in result:
            out.print(Text(f"wrote {result['copied']} (shipped recipe {result['recipe']}); edit it, then "
                           f"`dfx train {result['copied']}`"))
            return
        table = Table(show_header=True, box=None)
        for column in ("recipe", "task", "what"):
            table.add_column(column, overflow="fold")
        for item in result["recipes"]:
            what = Text(f"cannot be read: {item['error']}", style="red") if "error" in item else Text(item["summary"])
            table.add_row(Text(item["path"] if folder else item["name"]), item["task"] or "-", what)
        out.print(table)

    run(work, json_out=json_out, debug=debug, show=show)


def main() -> None:
    # Idle OpenMP threads sleep instead of spinning: on small or shared machines (and next to
    # data-loader workers) spinning threads stall every kernel. Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.argv = [sys.argv[0], *_seeds_list(_resume_flag(sys.argv[1:]))]
    handle_sigterm()
    json_out = "--json" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:  # bare `dfx`: the help, and exit 2 as Typer does
        print(e.ctx.get_help(), file=sys.stderr if json_out else sys.stdout)
        if json_out:
            report(f"no command given; see `{e.ctx.command_path} --help`", 2, json_out)
        code = 2
    except ParseError as e:  # Typer's own: missing argument, unknown option or command
        hint = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
        report(f"{e.format_message().rstrip('.')}{hint}", 2, json_out)
        code = 2
    except (KeyboardInterrupt, typer.Abort) as e:  # outside a command's work, e.g. while launching torchrun
        code, message = _interrupted(e if isinstance(e, KeyboardInterrupt) else KeyboardInterrupt())
        report(message, code, json_out)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
