"""task: fusion and `dfx fuse`: recipes, the per-stream evaluator, training, --compare, errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from dfx.data.shapes_rgbd import generate_shapes_rgbd
from dfx.errors import UsageError
from dfx.recipe import build_recipe, load_recipe
from dfx.tasks.fusion import FusionEvaluator, Task

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TINY_FUSION = """\
task: fusion
model:
  fusion: gemini
  embed_dims: [8, 16, 16, 16]
  depths: [1, 1, 1, 1]
  num_heads: [1, 2, 2, 2]
  decoder_dim: 16
data:
  root: {root}
  image_size: 32
train:
  epochs: 1
  batch_size: 8
  lr: 2.0e-3
  seed: 0
  num_workers: 0
  log_every: 1
eval:
  batch_size: 8
"""


@pytest.fixture(scope="session")
def rgbd_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rgbd")
    generate_shapes_rgbd(root, train_images=16, val_images=8, size=32)
    return root


@pytest.fixture
def fusion_recipe(tmp_path, rgbd_data) -> Path:
    path = tmp_path / "tiny-fuse.yaml"
    path.write_text(textwrap.dedent(TINY_FUSION.format(root=rgbd_data)))
    return path


def dfx(*args):
    """``dfx ARGS`` in-process (typer's runner): the same command line without paying for the imports again."""
    from typer.testing import CliRunner

    from dfx.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    result.returncode = result.exit_code
    return result


def test_shipped_recipes_validate():
    quick = load_recipe(RECIPES / "gemini-shapes.yaml")
    assert quick.task == "fusion" and quick.model.fusion == "gemini" and quick.data.root == "shapes-rgbd"
    nyu = load_recipe(RECIPES / "gemini-nyudv2-mitb3.yaml")
    assert (nyu.model.variant, nyu.data.size, nyu.train.lr, nyu.train.decoder_lr_mult) == ("b3", (480, 640), 6e-5, 10)
    assert (nyu.train.warmup_steps, nyu.model.drop_path_rate, nyu.train.scheduler) == (1500, 0.4, "poly")
    assert len(nyu.data.classes) == 40 and nyu.data.labels == "masks"
    deliver = load_recipe(RECIPES / "gemini-deliver-mitb2.yaml")
    assert deliver.model.variant == "b2" and len(deliver.data.modalities) == 4


def test_recipe_errors():
    with pytest.raises(UsageError, match=r"model.fusion: expected one of .* got 'gemeni' .*did you mean gemini"):
        build_recipe({"task": "fusion", "model": {"fusion": "gemeni"}})
    with pytest.raises(UsageError, match=r"model.fusion 'cross-attn' fuses two or more modalities but "
                                         r"data.modalities lists \['rgb'\]"):
        build_recipe({"task": "fusion", "model": {"fusion": "cross-attn"}, "data": {"modalities": ["rgb"]}})
    with pytest.raises(UsageError, match=r"embed_dims must divide by num_heads"):
        build_recipe({"task": "fusion", "model": {"embed_dims": [8, 16, 16, 18], "num_heads": [1, 2, 2, 4]}})


def test_param_groups_scale_the_decoder_and_skip_decay_on_norms(fusion_recipe):
    recipe = load_recipe(fusion_recipe, ["train.decoder_lr_mult=10", "train.weight_decay=0.01"])
    task = Task(recipe)
    model = task.build_model()
    groups = task.param_groups(model)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.decode_head.linear_pred.weight)]["lr_scale"] == 10
    assert by_param[id(model.ensemble_weights)]["lr_scale"] == 10
    assert by_param[id(model.backbone.block1[0].attn.q.weight)] == {**by_param[id(model.backbone.block1[0].attn.q.weight)],
                                                                    "lr_scale": 1.0, "weight_decay": 0.01}
    assert by_param[id(model.backbone.norm1.ln_1.weight)]["weight_decay"] == 0.0


def test_evaluator_reports_the_ensemble_and_each_stream():
    class Fixed(torch.nn.Module):
        def forward(self, images, streams=False):
            good = torch.nn.functional.one_hot(torch.tensor([[0, 1], [1, 1]]), 2).permute(2, 0, 1)[None].float()
            wrong = 1 - good
            return {"ensemble": good, "streams": [good, wrong]}

    evaluator = FusionEvaluator(["bg", "obj"], ["rgb", "depth"])
    evaluator.update(Fixed(), (torch.zeros(1, 2, 3, 2, 2), torch.tensor([[[0, 1], [1, 1]]])))
    metrics = evaluator.summarize([evaluator.state()])
    assert metrics["mIoU"] == 1.0 and metrics["mIoU/rgb"] == 1.0 and metrics["mIoU/depth"] == 0.0


@pytest.mark.slow
def test_fuse_trains_and_reports_per_stream_miou(fusion_recipe):
    from test_cli import dfx as dfx_subprocess  # one real process: the --json contract end to end

    result = dfx_subprocess("fuse", fusion_recipe, "--fusion", "gemini", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["fusion"] == "gemini" and payload["epochs"] == 1
    assert {"mIoU", "pixel_acc", "mIoU/rgb", "mIoU/depth"} <= set(payload["metrics"])
    assert "epoch 1/1" in result.stderr and result.stdout.strip().count("\n") == 0
    evaluated = dfx("eval", payload["run_dir"], "--json")  # a fusion run evaluates like any other
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["metrics"]["mIoU"] == pytest.approx(payload["best"]["mIoU"])


@pytest.mark.slow
def test_compare_tabulates_every_strategy(fusion_recipe, tmp_path):
    from dfx.compare import markdown

    result = dfx("fuse", fusion_recipe, "--compare", "none,gemini", "--out", tmp_path / "cmp", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    rows = {row["variant"]: row for row in payload["rows"]}
    assert list(rows) == ["none", "gemini"]
    assert [r["overrides"] for r in payload["rows"]] == [["model.fusion=none"], ["model.fusion=gemini"]]
    assert payload["seeds"] == [0] and payload["metric"] == "mIoU"
    assert "mIoU/rgb" not in rows["none"]["metrics_mean"] and "mIoU/depth" in rows["gemini"]["metrics_mean"]
    assert rows["gemini"]["params_m"] > rows["none"]["params_m"]
    assert rows["gemini"]["gflops"] > 1.5 * rows["none"]["gflops"]  # two streams
    for name in ("compare.json", "compare.csv", "compare.md", "compare.png"):
        assert (tmp_path / "cmp" / name).is_file()
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table == markdown(payload) and "| mIoU/rgb | mIoU/depth |" in table
    run = Path(payload["runs"][1]["run_dir"])
    assert (run / "checkpoints" / "best.safetensors").is_file() and "fusion: gemini" in (run / "recipe.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["--fusion", "gemeni"], "fusion 'gemeni' is not a strategy (did you mean gemini?)"),
    (["--compare", "none,xchange"], "fusion 'xchange' is not a strategy (did you mean exchange?)"),
    (["--compare", "none", "--fusion", "gemini"], "--compare trains the listed strategies"),
])
def test_bad_strategies_exit_2(fusion_recipe, args, message):
    result = dfx("fuse", fusion_recipe, *args, "--json")
    assert result.returncode == 2
    assert message in json.loads(result.stdout)["error"]


def test_missing_nyudv2_data_names_the_layout(tmp_path):
    result = dfx("fuse", RECIPES / "gemini-nyudv2-mitb3.yaml", f"data.root={tmp_path / 'nyudv2'}", "--json")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert "nyudv2 does not exist" in error and "<root>/<modality>/<id>.png" in error
    result = dfx("fuse", RECIPES / "segmenter-shapes.yaml", "--json")
    assert result.returncode == 2 and "dfx fuse takes a fusion recipe" in json.loads(result.stdout)["error"]
