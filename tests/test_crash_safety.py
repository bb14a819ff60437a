"""Fault injection: a run killed after each file-system write of an epoch end, then resumed.

A forked copy of the test process trains the tiny recipe for two epochs and sends itself a
signal right after its n-th write (a rename, an fsync that completes a temporary file, a
deletion or a new folder), for every n inside an epoch end. ``--resume`` must then end with
weights bitwise equal to the uninterrupted run, and records holding each epoch exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfx.engine import checkpoint as ckpt
from dfx.engine import train
from dfx.files import write_text_atomic

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

WRITES = ("replace", "rename", "fsync", "unlink", "mkdir", "rmdir")
EPOCHS = ["train.epochs=2"]


def count_writes(patch, on_write) -> None:
    """Wrap the os functions that change the file system; ``on_write()`` runs after each success."""
    for name in WRITES:
        def wrapped(*args, _original=getattr(os, name), **kwargs):
            result = _original(*args, **kwargs)
            on_write()
            return result

        patch(os, name, wrapped)


@pytest.fixture
def one_thread(monkeypatch):
    """Bitwise comparisons across processes: the same CPU kernels, one thread everywhere.

    Drawing results.png takes most of a tiny epoch; a stand-in writes the file the same way
    (one atomic write), so the epoch end keeps its sequence of writes at a fraction of the time.
    """
    monkeypatch.setattr("dfx.engine.trainer.plot",
                        lambda run_dir, rows: write_text_atomic(Path(run_dir) / "results.png", json.dumps(rows)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference(tiny_recipe, tmp_path, monkeypatch, one_thread):
    """The uninterrupted run, and for each epoch end the numbers of its first and last writes."""
    count, windows = [0], {}

    def tick():
        count[0] += 1

    commit = ckpt.commit_epoch

    def commit_epoch(folder, weights, state):
        windows[state["epoch"]] = [count[0] + 1, None]
        return commit(folder, weights, state)

    def epoch_saved(epoch, **_):
        windows[epoch][1] = count[0]

    with monkeypatch.context() as m:
        count_writes(m.setattr, tick)
        m.setattr(ckpt, "commit_epoch", commit_epoch)
        result = train(tiny_recipe, EPOCHS, out=tmp_path / "reference", quiet=True, callbacks=[epoch_saved])
    return Path(result["run_dir"]), windows


def run_until_write(recipe: Path, out: Path, n: int, sig: int) -> tuple[int, int]:
    """Train in a forked process that sends itself ``sig`` after its ``n``-th write; returns
    (exit code, terminating signal) as os.waitpid reports them."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            import typer

            from dfx.cli import handle_sigterm, run

            count = [0]

            def tick():
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), sig)

            count_writes(setattr, tick)
            handle_sigterm()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            run(lambda: train(recipe, EPOCHS, out=out, quiet=True), json_out=False, debug=False, show=lambda r: None)
            code = 0
        except typer.Exit as e:
            code = e.exit_code
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return (os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)


def epochs_recorded(run_dir: Path) -> tuple[list[int], list[int]]:
    jsonl = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with open(run_dir / "results.csv") as f:
        table = [int(row["epoch"]) for row in csv.DictReader(f)]
    return jsonl, table


def assert_same_as_reference(run_dir: Path, reference: Path, where: str) -> None:
    for name in ("last", "best"):
        want = load_file(str(reference / "checkpoints" / f"{name}.safetensors"))
        got = load_file(str(run_dir / "checkpoints" / f"{name}.safetensors"))
        assert got.keys() == want.keys(), where
        for key in want:
            assert torch.equal(got[key], want[key]), f"{where}: {name}.safetensors {key} differs"
    assert epochs_recorded(run_dir) == ([1, 2], [1, 2]), where
    rows = [{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want_rows = [{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"}
                 for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert rows == want_rows, where
    leftovers = [p.name for p in run_dir.rglob("*") if ".tmp-" in p.name or ".next." in p.name]
    assert leftovers == [], f"{where}: {leftovers}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_after_any_write_of_an_epoch_end_resumes_to_the_uninterrupted_run(tiny_recipe, tmp_path, reference,
                                                                                sig):
    ref_dir, windows = reference
    first, last = windows[2]
    # the epoch end writes weights, state, records and plot: at least that many writes
    assert last - first + 1 >= 8, windows
    points = list(range(first, last + 1))
    if sig == signal.SIGKILL:  # also the first epoch's end: a run with no committed checkpoint yet
        points = list(range(windows[1][0], windows[1][1] + 1)) + points
    for n in points:
        out = tmp_path / f"{sig.name}-{n}"
        code, killed_by = run_until_write(tiny_recipe, out, n, sig)
        where = f"{sig.name} after write {n} (epoch ends: {windows})"
        if sig == signal.SIGKILL:
            assert killed_by == signal.SIGKILL, where
        else:
            assert code == 128 + sig, where  # the CLI's exit code for the signal: stopped cleanly
        resumed = train(tiny_recipe, resume=out, quiet=True)
        assert resumed["epochs"] == 2, where
        assert_same_as_reference(out, ref_dir, where)
