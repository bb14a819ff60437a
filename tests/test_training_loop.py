"""The training loop's steps: one logging channel (stderr, --quiet, --json), the loss read only at
log points, and train.compile."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfx.cli import app
from dfx.engine import load_model, train
from dfx.errors import RunError
from dfx.tasks.classification import Task


@pytest.fixture
def step_losses(monkeypatch) -> list[float]:
    """The loss of every training step, read in the test (the loop itself reads it only at log points)."""
    seen: list[float] = []
    original = Task.loss

    def recording(self, net, batch):
        loss, logs = original(self, net, batch)
        seen.append(float(loss.detach()))
        return loss, logs

    monkeypatch.setattr(Task, "loss", recording)
    return seen


def test_quiet_train_writes_nothing_on_stderr_but_warnings(tiny_recipe):
    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "train.epochs=1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert "run directory: runs/classification/tiny" in result.stdout  # the summary still prints
    # a warning that matters still shows under --quiet, once, on stderr
    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "train.epochs=1", "train.amp=bf16", "--device",
                                      "cpu", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "dfx: train.amp applies on CUDA only; training in float32 on CPU\n"


def test_logs_go_to_stderr_and_json_keeps_stdout_one_object(tiny_recipe, step_losses):
    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "train.epochs=1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["run_dir"] == "runs/classification/tiny"
    assert result.stdout.count("\n") == 1
    lines = result.stderr.splitlines()
    assert "dfx: run directory runs/classification/tiny" in lines
    # log_every 2: a line at every second step and at the last, each with the mean loss since the previous line
    steps = len(step_losses)
    shown = [re.match(rf"epoch 1/1 step (\d+)/{steps} loss (\S+) lr", line) for line in lines]
    shown = [(int(m[1]), float(m[2])) for m in shown if m]
    assert steps == 5 and [step for step, _ in shown] == [2, 4, 5]
    for (start, _), (step, loss) in zip([(0, None), *shown], shown):
        window = step_losses[start:step]
        assert loss == float(f"{sum(window) / len(window):.4g}")
    assert any(line.startswith("epoch 1/1 train/loss ") for line in lines)  # the epoch's evaluation line


def test_the_epoch_loss_is_the_mean_of_the_step_losses(tiny_recipe, step_losses):
    run_dir = Path(train(tiny_recipe, quiet=True)["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(step_losses) == 10  # 2 epochs of 5 steps
    for row, losses in zip(rows, (step_losses[:5], step_losses[5:])):
        assert row["train/loss"] == pytest.approx(sum(losses) / 5, rel=1e-12)
    assert rows[1]["train/loss"] < rows[0]["train/loss"]


def test_a_non_finite_loss_names_the_steps_and_commits_nothing(tiny_recipe, monkeypatch):
    original, calls = Task.loss, []

    def breaking(self, net, batch):
        loss, logs = original(self, net, batch)
        calls.append(1)
        return (loss * math.nan if len(calls) == 3 else loss), logs

    monkeypatch.setattr(Task, "loss", breaking)
    with pytest.raises(RunError, match=r"training loss became nan at epoch 1 in steps 3-4; lower train.lr"):
        train(tiny_recipe, quiet=True)
    assert len(calls) == 4  # found at the next log point, not at the end of the epoch
    assert not (Path("runs/classification/tiny/checkpoints") / "last.safetensors").exists()


@pytest.mark.slow  # two trainings
def test_compiled_training_matches_eager_and_saves_plain_keys(tiny_recipe, step_losses, monkeypatch):
    """``train.compile: true`` trains through ``torch.compile``. Dynamo captures the graphs and AOTAutograd
    builds forward and backward as with the default backend; the backend here is ``aot_eager`` instead
    of inductor, whose C++ code generation would take most of a minute on a cold cache."""
    compiled_modules = []
    real_compile = torch.compile

    def compile_aot_eager(model, **kwargs):
        compiled_modules.append(model)
        return real_compile(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    eager = train(tiny_recipe, ["train.epochs=1"], quiet=True)
    assert compiled_modules == []
    eager_losses = list(step_losses)
    step_losses.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(tiny_recipe, ["train.epochs=1", "train.compile=true"], quiet=True)
    assert len(compiled_modules) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # Dynamo did capture the network
    assert len(step_losses) == 5 and all(math.isfinite(v) for v in step_losses)
    assert step_losses[0] == pytest.approx(eager_losses[0], abs=1e-5)  # same seed, same first batch
    run_dir = Path(compiled["run_dir"])
    saved = load_file(str(run_dir / "checkpoints" / "last.safetensors"))
    assert not any("_orig_mod" in key for key in saved)
    assert set(saved) == set(load_file(str(Path(eager["run_dir"]) / "checkpoints" / "last.safetensors")))
    _, _, model, meta = load_model(run_dir)  # a fresh (eager) model takes the compiled run's weights
    assert meta["recipe"]["train"]["compile"] is True
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert math.isfinite(compiled["metrics"]["loss"])
