"""Run directories: ``runs/<task>/<recipe-stem>[-N]/``.

A run directory holds ``recipe.yaml`` (fully resolved), ``metrics.jsonl``, ``results.csv``,
``results.png`` and ``checkpoints/{last,best}.safetensors`` (+ ``last.state.pt``), and while a
process trains in it, ``.lock`` (an OS lock: released by the kernel when the process dies, even
by kill -9, so a stale lock is taken over without anybody deleting it).
"""

from __future__ import annotations

import re
from pathlib import Path

from dfx.errors import RunError, UsageError
from dfx.files import FileLock, write_error

RUNS = Path("runs")
LOCK = ".lock"


def new_run_dir(task: str, stem: str, out: str | Path | None = None, resumable: bool = True) -> Path:
    """Create and return a fresh run directory; never reuses a non-empty one. ``resumable``: the
    command has ``--resume`` (say so when ``--out`` is taken)."""
    if out is not None:
        out = Path(out)
        check_out_path(out, "a folder")
        if out.exists() and any(out.iterdir()):
            fix = f"pass --resume {out} to continue that run or choose another --out" if resumable else \
                "choose another --out (nothing there is overwritten)"
            raise UsageError(f"--out {out}: already exists and is not empty; {fix}")
        _mkdir(out, parents=True, exist_ok=True)
        return out
    parent = RUNS / task
    _mkdir(parent, parents=True, exist_ok=True)
    for n in range(1, 100_000):
        path = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()  # atomic: two runs started together get different folders
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise write_error(path, e) from None
    raise UsageError(f"too many runs of {stem} under {parent}")


def check_out_path(out: Path, kind: str) -> None:
    """A UsageError when ``--out`` cannot be ``kind`` ("a folder", "an .onnx file"): it, or a folder
    above it, is an existing file."""
    if kind == "a folder" and out.is_file():
        raise UsageError(f"--out {out}: is a file; --out names {kind} (new, or empty)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"--out {out}: {blocking} is a file, not a folder; choose another --out")


def _mkdir(path: Path, **kwargs) -> None:
    try:
        path.mkdir(**kwargs)
    except OSError as e:
        raise write_error(path, e) from None


def _run_number(path: Path, stem: str) -> int:
    if path.name == stem:
        return 1
    m = re.fullmatch(re.escape(stem) + r"-(\d+)", path.name)
    return int(m.group(1)) if m else 0


def latest_run(task: str, stem: str) -> Path:
    """The newest run of recipe ``stem``, whatever state it is in (it may have no checkpoint yet)."""
    parent = RUNS / task
    runs = [p for p in parent.glob(f"{stem}*") if _run_number(p, stem) and (p / "recipe.yaml").is_file()]
    if not runs:
        raise UsageError(
            f"--resume: no run of recipe {stem!r} under {parent}/; "
            f"start one with `dfx train <recipe>` or pass --resume RUN_DIR"
        )
    return max(runs, key=lambda p: _run_number(p, stem))


def check_resumable(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: no such run directory")
    if not (run_dir / "recipe.yaml").is_file():
        raise UsageError(f"--resume {run_dir}: no recipe.yaml there; is this a dfx run directory?")
    return run_dir


class RunLock:
    """An exclusive lock on a run directory (``<run>/.lock``), held while one process writes it;
    a lock left by a killed process is taken over (see :class:`dfx.files.FileLock`)."""

    def __init__(self, run_dir: Path):
        self.lock = FileLock(Path(run_dir) / LOCK)

    def acquire(self) -> "RunLock":
        if not self.lock.acquire(wait=False):
            raise RunError(f"{self.lock.path.parent} is in use by process {self.lock.holder()} (it holds "
                           f"{self.lock.path}); wait for it to finish or stop it before resuming")
        return self

    def release(self) -> None:
        self.lock.release()
