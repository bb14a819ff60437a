"""Run directories: ``runs/<task>/<recipe-stem>[-N]/``.

A run directory holds ``recipe.yaml`` (fully resolved), ``metrics.jsonl``, ``results.csv``,
``results.png`` and ``checkpoints/{last,best}.safetensors`` (+ ``last.state.pt``).
"""

from __future__ import annotations

import re
from pathlib import Path

from dfx.errors import UsageError

RUNS = Path("runs")


def new_run_dir(task: str, stem: str, out: str | Path | None = None, resumable: bool = True) -> Path:
    """Create and return a fresh run directory; never reuses a non-empty one. ``resumable``: the
    command has ``--resume`` (say so when ``--out`` is taken)."""
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            fix = f"pass --resume {out} to continue that run or choose another --out" if resumable else \
                "choose another --out (nothing there is overwritten)"
            raise UsageError(f"--out {out}: already exists and is not empty; {fix}")
        out.mkdir(parents=True, exist_ok=True)
        return out
    parent = RUNS / task
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        path = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()  # atomic: two runs started together get different folders
            return path
        except FileExistsError:
            continue
    raise UsageError(f"too many runs of {stem} under {parent}")


def _run_number(path: Path, stem: str) -> int:
    if path.name == stem:
        return 1
    m = re.fullmatch(re.escape(stem) + r"-(\d+)", path.name)
    return int(m.group(1)) if m else 0


def latest_run(task: str, stem: str) -> Path:
    """The newest run of recipe ``stem`` that has a ``last`` checkpoint to resume from."""
    parent = RUNS / task
    runs = [p for p in parent.glob(f"{stem}*") if _run_number(p, stem) and (p / "checkpoints" / "last.state.pt").is_file()]
    if not runs:
        raise UsageError(
            f"--resume: no run of recipe {stem!r} with a checkpoint under {parent}/; "
            f"start one with `dfx train <recipe>` or pass --resume RUN_DIR"
        )
    return max(runs, key=lambda p: _run_number(p, stem))


def check_resumable(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "last.state.pt").is_file():
        raise UsageError(f"--resume {run_dir}: no checkpoints/last.state.pt there, nothing to resume")
    if not (run_dir / "recipe.yaml").is_file():
        raise UsageError(f"--resume {run_dir}: no recipe.yaml there; is this a dfx run directory?")
    return run_dir
