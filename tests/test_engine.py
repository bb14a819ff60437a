"""The training engine: run directories, checkpoints, bitwise resume, evaluation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfx.engine import evaluate_checkpoint, train
from dfx.engine.checkpoint import load_state, read_metadata
from dfx.errors import RunError, UsageError


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "checkpoints" / "last.safetensors"))


@pytest.mark.slow  # end-to-end training
def test_train_writes_a_complete_run_directory(tiny_recipe):
    result = train(tiny_recipe, quiet=True)
    run = Path(result["run_dir"])
    assert run == Path("runs/classification/tiny")
    for name in ("recipe.yaml", "metrics.jsonl", "results.csv", "results.png", "checkpoints/last.safetensors",
                 "checkpoints/best.safetensors", "checkpoints/last.state.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(result["metrics"]) == {"top1", "top5", "loss"}
    assert 0.0 <= result["metrics"]["top1"] <= 1.0 and result["metrics"]["top5"] >= result["metrics"]["top1"]
    assert result["metrics"]["top1"] == rows[-1]["val/top1"]
    best_epoch = max(rows, key=lambda r: r["val/top1"])["epoch"]  # first epoch reaching the max
    assert result["best"]["epoch"] == best_epoch
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train/loss", "lr", "val/top1"} <= set(header)
    meta = read_metadata(run / "checkpoints" / "last.safetensors")
    assert meta["task"] == "classification" and meta["epoch"] == 2 and meta["recipe"]["train"]["epochs"] == 2
    # a second run of the same recipe gets its own directory
    assert Path(train(tiny_recipe, ["train.epochs=1"], quiet=True)["run_dir"]).name == "tiny-2"


@pytest.mark.slow  # three trainings
def test_same_seed_same_weights_and_resume_is_bitwise(tiny_recipe, tmp_path):
    full = train(tiny_recipe, ["train.epochs=3"], out=tmp_path / "full", quiet=True)

    class Crash(Exception):
        pass

    def crash_after_first_epoch(epoch, **_):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        train(tiny_recipe, ["train.epochs=3"], out=tmp_path / "cut", quiet=True, callbacks=[crash_after_first_epoch])
    assert load_state(tmp_path / "cut" / "checkpoints" / "last.state.pt")["epoch"] == 1
    resumed = train(tiny_recipe, resume=tmp_path / "cut", quiet=True)
    assert resumed["run_dir"] == str(tmp_path / "cut")
    a, b = weights(full["run_dir"]), weights(resumed["run_dir"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert resumed["metrics"] == full["metrics"]


@pytest.mark.slow  # end-to-end training
def test_resume_latest_finds_the_newest_run_and_can_extend_epochs(tiny_recipe):
    train(tiny_recipe, ["train.epochs=1"], quiet=True)
    result = train(tiny_recipe, ["train.epochs=2"], resume="latest", quiet=True)
    assert result["run_dir"] == "runs/classification/tiny"
    assert load_state(Path(result["run_dir"]) / "checkpoints" / "last.state.pt")["epoch"] == 2


def test_resume_without_a_run_is_a_usage_error(tiny_recipe):
    with pytest.raises(UsageError, match="no run of recipe 'tiny'"):
        train(tiny_recipe, resume="latest", quiet=True)


def test_out_dir_that_is_not_empty_is_refused_and_untouched(tiny_recipe, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists and is not empty"):
        train(tiny_recipe, out=out, quiet=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow  # end-to-end training
def test_eval_reproduces_the_training_metrics(tiny_recipe):
    result = train(tiny_recipe, quiet=True)
    evaluated = evaluate_checkpoint(result["run_dir"], device="cpu")
    assert evaluated["checkpoint"].endswith("best.safetensors")
    best = {k: v for k, v in result["best"].items() if k != "epoch"}
    assert evaluated["metrics"] == pytest.approx(best)
    # a bare checkpoint file works too (its metadata carries the recipe)
    last = evaluate_checkpoint(Path(result["run_dir"]) / "checkpoints" / "last.safetensors", device="cpu")
    assert last["metrics"] == pytest.approx(result["metrics"])


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_lost(tiny_recipe):
    result = train(tiny_recipe, ["train.epochs=1"], quiet=True)
    run = Path(result["run_dir"])
    best = run / "checkpoints" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])  # truncated
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(RunError, match=r"cannot read checkpoint .*best\.safetensors"):
        evaluate_checkpoint(run, device="cpu")
    state = run / "checkpoints" / "last.state.pt"
    state.write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"cannot read training state .*last\.state\.pt"):
        train(tiny_recipe, resume=run, quiet=True)
    assert sorted(p.name for p in run.rglob("*")) == before


def test_unreadable_image_is_named(tiny_recipe, tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "train" / "circle" / "00000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UsageError, match=r"cannot read image .*circle/00000\.png"):
        train(tiny_recipe, [f"data.root={data}"], quiet=True)


def test_missing_data_root_and_cuda_without_gpu(tiny_recipe, tmp_path):
    with pytest.raises(UsageError, match=r"data\.root: .*nowhere/train does not exist"):
        train(tiny_recipe, [f"data.root={tmp_path / 'nowhere'}"], quiet=True)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU is available"):
            train(tiny_recipe, device="cuda", quiet=True)
    assert not Path("runs").exists() or not any(Path("runs").rglob("last.safetensors"))


def test_ema_and_sgd_step_schedule_run(tiny_recipe):
    result = train(tiny_recipe, ["train.ema=true", "train.ema_decay=0.5", "train.optimizer=sgd",
                                 "train.scheduler=step", "train.decay_epochs=1", "train.epochs=2"], quiet=True)
    state = load_state(Path(result["run_dir"]) / "checkpoints" / "last.state.pt")
    assert "ema" in state
    # step schedule: lr after 2 epochs is lr * decay_rate^2 (no warmup)
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[1]["lr"] == pytest.approx(1e-5)


def test_bare_resume_takes_the_newest_run_even_without_a_checkpoint(tiny_recipe):
    first = Path(train(tiny_recipe, ["train.epochs=1"], quiet=True)["run_dir"])
    before = (first / "checkpoints" / "last.safetensors").read_bytes()
    crashed = first.parent / "tiny-2"  # a run killed in its first epoch: recipe only
    crashed.mkdir()
    (crashed / "recipe.yaml").write_text((first / "recipe.yaml").read_text())
    result = train(tiny_recipe, ["train.epochs=1"], resume="latest", quiet=True)
    assert result["run_dir"] == str(crashed)
    assert load_state(crashed / "checkpoints" / "last.state.pt")["epoch"] == 1
    assert (first / "checkpoints" / "last.safetensors").read_bytes() == before  # the older run is untouched


@pytest.mark.slow  # end-to-end training
def test_a_run_directory_in_use_is_refused_and_a_dead_holders_lock_taken_over(tiny_recipe, tmp_path):
    from dfx.engine.rundir import RunLock

    run = Path(train(tiny_recipe, ["train.epochs=1"], out=tmp_path / "run", quiet=True)["run_dir"])
    held = RunLock(run).acquire()
    try:
        with pytest.raises(RunError, match=rf"{run} is in use by process {os.getpid()}"):
            train(tiny_recipe, ["train.epochs=2"], resume=run, quiet=True)
    finally:
        held.release()
    (run / ".lock").write_text("999999999")  # left by a process that no longer exists: no OS lock held
    assert load_state(Path(train(tiny_recipe, ["train.epochs=2"], resume=run, quiet=True)["run_dir"])
                      / "checkpoints" / "last.state.pt")["epoch"] == 2


def flip_a_bit(path: Path, at_fraction: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at_fraction)] ^= 0x10
    path.write_bytes(bytes(data))


def test_bit_flips_in_checkpoints_are_errors_naming_the_file(tiny_recipe, tmp_path):
    run = Path(train(tiny_recipe, ["train.epochs=1"], out=tmp_path / "run", quiet=True)["run_dir"])
    flip_a_bit(run / "checkpoints" / "best.safetensors")  # tensor data sits at the end of the file
    with pytest.raises(RunError, match=r"checkpoint .*best\.safetensors is corrupt: its tensor data does not match"):
        evaluate_checkpoint(run, device="cpu")
    flip_a_bit(run / "checkpoints" / "last.state.pt", 0.5)
    with pytest.raises(RunError, match=r"cannot read training state .*last\.state\.pt: (its bytes do not match|.*corrupt)"):
        train(tiny_recipe, resume=run, quiet=True)


@pytest.mark.slow  # end-to-end training
def test_weights_from_another_epoch_are_refused_not_mixed(tiny_recipe, tmp_path):
    run = Path(train(tiny_recipe, ["train.epochs=1"], out=tmp_path / "run", quiet=True)["run_dir"])
    other = Path(train(tiny_recipe, ["train.epochs=2"], out=tmp_path / "other", quiet=True)["run_dir"])
    shutil.copy(other / "checkpoints" / "last.safetensors", run / "checkpoints" / "last.safetensors")
    with pytest.raises(RunError, match=r"last\.safetensors does not belong with .*last\.state\.pt \(epoch 1\)"):
        train(tiny_recipe, ["train.epochs=2"], resume=run, quiet=True)


def test_unwritable_checkpoints_fail_before_training(tiny_recipe, tmp_path, monkeypatch):
    import dfx.engine.trainer as trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(tiny_recipe.read_text())
    (run / "checkpoints").write_text("not a folder")  # stands in for a read-only checkpoints/ (tests run as root)
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: pytest.fail("trained before checking the folder"))
    with pytest.raises(RunError, match=rf"cannot write {run / 'checkpoints'}: "):
        train(tiny_recipe, resume=run, quiet=True)


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tiny_recipe, tmp_path, monkeypatch):
    import errno

    import dfx.engine.checkpoint as ckpt

    run = Path(train(tiny_recipe, ["train.epochs=1"], out=tmp_path / "run", quiet=True)["run_dir"])
    kept = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(RunError, match=r"cannot write .*last\.next\.safetensors: no space left on the device"):
        train(tiny_recipe, ["train.epochs=2"], resume=run, quiet=True)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == kept
    assert oct((run / "checkpoints" / "last.safetensors").stat().st_mode & 0o777) == oct(
        (run / "metrics.jsonl").stat().st_mode & 0o777)  # checkpoints share the run's file mode
