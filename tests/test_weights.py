"""Whole-model weights and dfx.create_model: sources, safe reading, strict loading, evaluation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dfx
from dfx.engine import evaluate_checkpoint, train
from dfx.errors import RunError, UsageError
from dfx.weights import read_torch_file


class NotAllowed:
    """A type no weights file may ask torch.load to rebuild."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-epoch run of the tiny classification recipe (5 classes, 32 px)."""
    import os
    import textwrap

    from dfx.data.embedded import generate_shapes_cls
    from tests.conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("weights-run")
    generate_shapes_cls(folder / "data", seed=0, train_per_class=8, val_per_class=4)
    recipe = folder / "tiny.yaml"
    recipe.write_text(textwrap.dedent(TINY_RECIPE.format(root=folder / "data")))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return folder / train(recipe, quiet=True)["run_dir"]
    finally:
        os.chdir(cwd)


def _recipe(run_dir: Path) -> Path:
    return run_dir.parent.parent.parent / "tiny.yaml"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))


def test_create_model_from_a_run_a_checkpoint_and_a_recipe_give_one_model(run_dir):
    from_run = dfx.create_model(run_dir)
    assert not from_run.training
    reference = _logits(from_run)
    assert reference.shape == (2, 5)
    from_file = dfx.create_model(run_dir / "checkpoints" / "last.safetensors")
    # a recipe whose data does not exist: the classes come from model.num_classes, the data is never read
    from_recipe = dfx.create_model(_recipe(run_dir), ["model.num_classes=5", "data.root=/nonexistent"],
                                   weights=run_dir / "checkpoints" / "best.safetensors")
    assert torch.allclose(_logits(from_recipe), reference)
    best, last = run_dir / "checkpoints" / "best.safetensors", run_dir / "checkpoints" / "last.safetensors"
    assert torch.allclose(_logits(from_file), reference) == (best.read_bytes() == last.read_bytes())


def test_a_recipe_without_classes_is_refused_before_any_data_is_read(run_dir):
    with pytest.raises(UsageError, match="names no classes; set model.num_classes"):
        dfx.create_model(_recipe(run_dir), ["data.root=/nonexistent"])


def test_released_style_torch_files_load_with_their_harmless_extras(run_dir, tmp_path):
    state = dfx.create_model(run_dir).state_dict()
    file = tmp_path / "release.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4, epochs=12),
                "best_val": np.float64(0.5), "epoch": np.int64(11)}, file)
    model = dfx.create_model(_recipe(run_dir), ["model.num_classes=5"], weights=file)
    assert torch.allclose(_logits(model), _logits(dfx.create_model(run_dir)))


def test_a_pickle_of_any_other_type_is_refused_not_executed(tmp_path):
    file = tmp_path / "hostile.pth"
    torch.save({"model": {}, "payload": NotAllowed()}, file)
    with pytest.raises(UsageError, match="refused to unpickle .*NotAllowed"):
        read_torch_file(file)


def test_truncated_file_is_a_run_error_naming_it(run_dir, tmp_path):
    file = tmp_path / "cut.pth"
    torch.save({"model": dfx.create_model(run_dir).state_dict()}, file)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(RunError, match="cut.pth.*corrupt"):
        dfx.create_model(_recipe(run_dir), ["model.num_classes=5"], weights=file)


def test_a_file_of_another_format_names_the_formats_understood(run_dir, tmp_path):
    file = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(2)}, file)
    with pytest.raises(UsageError, match="other.pth: not a checkpoint format .*understood: a dfx checkpoint"):
        dfx.create_model(_recipe(run_dir), ["model.num_classes=5"], weights=file)


def test_mismatched_shapes_name_each_key_with_both_shapes(run_dir):
    with pytest.raises(UsageError) as caught:
        dfx.create_model(_recipe(run_dir), ["model.num_classes=4"], weights=run_dir)
    message = str(caught.value)
    assert "head.weight: checkpoint (5, 32) vs model (4, 32)" in message
    assert "head.bias: checkpoint (5,) vs model (4,)" in message
    assert "model.weights_strict=false" in message


def test_not_strict_loads_what_fits_and_warns(run_dir):
    with pytest.warns(UserWarning, match="2 problems"):
        model = dfx.create_model(_recipe(run_dir), ["model.num_classes=4", "model.weights_strict=false"],
                                 weights=run_dir)
    reference = dfx.create_model(run_dir).state_dict()
    loaded = model.state_dict()
    same = [k for k in reference if k in loaded and reference[k].shape == loaded[k].shape]
    assert len(same) == len(reference) - 2
    assert all(torch.equal(reference[k], loaded[k]) for k in same)


def test_eval_of_a_recipe_with_weights_equals_eval_of_the_run(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    of_run = evaluate_checkpoint(run_dir, device="cpu")
    of_recipe = evaluate_checkpoint(_recipe(run_dir), [f"model.weights={run_dir}"], device="cpu")
    assert of_recipe["metrics"] == pytest.approx(of_run["metrics"])
    assert of_recipe["checkpoint"] == of_run["checkpoint"]
    with pytest.raises(UsageError, match="pass model.weights=FILE"):
        evaluate_checkpoint(_recipe(run_dir), device="cpu")


def test_training_starts_from_model_weights(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(_recipe(run_dir), [f"model.weights={run_dir}", "train.epochs=1", "train.lr=1e-12"], quiet=True)
    trained = dfx.create_model(result["run_dir"])
    assert torch.allclose(_logits(trained), _logits(dfx.create_model(run_dir)), atol=1e-6)
    assert json.loads((Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
