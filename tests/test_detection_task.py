"""Detection end to end: recipes, `dfx train` on a tiny shapes-det, `dfx eval --json`, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dfx.cli import app
from dfx.data.shapes_det import generate_shapes_det
from dfx.engine import train
from dfx.errors import UsageError
from dfx.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["model.backbone=resnet10t", "model.dim=32", "model.heads=4", "model.encoder_layers=1",
        "model.decoder_layers=2", "model.ffn_dim=64", "model.one2one_queries=10", "model.one2many_queries=20",
        "model.one2many_k=2", "data.scales=[64]", "data.max_size=64", "data.crop=null", "train.epochs=1",
        "train.batch_size=2", "train.num_workers=0", "train.warmup_steps=0", "eval.batch_size=4",
        "eval.draw_images=2"]


@pytest.fixture(scope="module")
def det_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes-det")
    generate_shapes_det(root, seed=0, train_images=4, val_images=3)
    return root


@pytest.fixture(scope="module")
def det_run(det_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs") / "hdetr"
    return train(RECIPES / "hdetr-shapes.yaml", [f"data.root={det_root}", *TINY], out=out, device="cpu", quiet=True)


def test_recipes_resolve_to_the_papers_settings():
    hdetr = load_recipe(RECIPES / "hdetr.yaml")
    model = hdetr.model
    assert (model.one2one_queries, model.one2many_queries, model.one2many_k, model.one2many_weight) == (300, 1500, 6, 1.0)
    assert model.two_stage and model.box_refine and model.mixed_query_selection and model.look_forward_twice
    assert model.two_stage_scoring == "agnostic" and model.frozen_bn and model.backbone_frozen_stages == 1
    assert (hdetr.data.crop, hdetr.data.crop_resize, len(hdetr.data.classes), len(hdetr.data.category_ids)) == \
        ([384, 600], [400, 500, 600], 80, 80)
    assert (model.dropout, model.ffn_dim, hdetr.train.lr, hdetr.train.backbone_lr) == (0.0, 2048, 2e-4, 2e-5)
    assert (hdetr.train.weight_decay, hdetr.train.grad_clip, hdetr.train.epochs, hdetr.train.milestones) == \
        (1e-4, 0.1, 12, [11])
    baseline = load_recipe(RECIPES / "deformable-detr.yaml")
    assert baseline.model.one2many_queries == 0 and baseline.model.ffn_dim == 2048
    shapes, shapes_baseline = load_recipe(RECIPES / "hdetr-shapes.yaml"), load_recipe(RECIPES / "deformable-detr-shapes.yaml")
    assert shapes.data.root == "shapes-det" and shapes.model.one2many_queries > 0
    assert shapes_baseline.model.one2many_queries == 0
    assert {k: v for k, v in vars(shapes.model).items() if k != "one2many_queries"} == \
        {k: v for k, v in vars(shapes_baseline.model).items() if k != "one2many_queries"}


def test_training_writes_coco_outputs(det_run):
    run_dir = Path(det_run["run_dir"])
    metrics = det_run["metrics"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AR100"))
    assert {f"AP/{name}" for name in ("circle", "square", "triangle", "cross")} <= set(metrics)
    for name in ("predictions.json", "pr_curve.png", "predictions.png", "checkpoints/best.safetensors"):
        assert (run_dir / name).stat().st_size > 0, name
    predictions = json.loads((run_dir / "predictions.json").read_text())
    assert len(predictions) == 3 * 10 * 4  # 3 val images x all 10 queries x 4 classes (fewer than 100 pairs)
    assert {p["category_id"] for p in predictions} <= {1, 3, 5, 7}


def test_eval_json_gives_files_pycocotools_reads(det_run, det_root):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    result = CliRunner().invoke(app, ["eval", det_run["run_dir"], "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"metrics", "predictions", "annotations"}
    gt = COCO(payload["annotations"])
    detections = gt.loadRes(payload["predictions"])
    evaluation = COCOeval(gt, detections, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert payload["metrics"]["AP"] == pytest.approx(max(evaluation.stats[0], 0.0), abs=1e-9)
    assert payload["metrics"]["AP50"] == pytest.approx(max(evaluation.stats[1], 0.0), abs=1e-9)


def test_missing_coco_names_the_layout(tmp_path):
    result = CliRunner().invoke(app, ["train", str(RECIPES / "hdetr.yaml"), f"data.root={tmp_path / 'coco'}",
                                      "model.pretrained=null", "--device", "cpu"])
    assert result.exit_code == 2
    assert "train2017" in result.output and "annotations" in result.output


def test_backbone_and_offsets_get_their_learning_rates(det_root):
    from dfx.tasks.detection import Task

    recipe = load_recipe(RECIPES / "hdetr-shapes.yaml", [f"data.root={det_root}", *TINY, "train.lr=1e-3",
                                                        "train.backbone_lr=1e-4", "train.offset_lr_mult=0.1"])
    task = Task(recipe)
    model = task.build_model()
    groups = task.param_groups(model)
    ids = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert ids[id(model.backbone.body.conv1[0].weight)] == 1e-4
    assert ids[id(model.decoder.layers[0].cross_attn.sampling_offsets.weight)] == pytest.approx(1e-4)
    assert ids[id(model.decoder.layers[0].cross_attn.value_proj.weight)] == 1e-3
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_bad_model_switches_are_usage_errors(det_root):
    with pytest.raises(UsageError, match="model: .*two_stage"):
        load_recipe(RECIPES / "hdetr-shapes.yaml", ["model.two_stage=false"])


@pytest.mark.parametrize("override, message", [
    ("loss.cost_class=-1", r"^loss\.cost_class must be >= 0, got -1\.0$"),
    ("loss.focal_alpha=1.5", r"^loss\.focal_alpha must be in \[0, 1\], got 1\.5$"),
    ("loss.giou_weight=-0.5", r"^loss\.giou_weight must be >= 0, got -0\.5$"),
    ("model.one2many_k=0", r"^model\.one2many_k must be an integer >= 1, got 0$"),
    ("model.one2many_weight=-1", r"^model\.one2many_weight must be >= 0, got -1\.0$"),
    ("model.hybrid_attention=bogus", r"^model\.hybrid_attention: expected one of 'grouped', 'masked', got 'bogus'"),
    ("model.two_stage_scoring=aware", r"^model\.two_stage_scoring: expected one of 'agnostic', 'class_aware'.*"
                                      r"did you mean class_aware"),
])
def test_bad_loss_and_switch_values_name_their_recipe_key(override, message):
    with pytest.raises(UsageError, match=message):
        load_recipe(RECIPES / "hdetr-shapes.yaml", [override])


def test_the_loss_section_and_the_criterion_share_their_defaults():
    from dfx.detection import HungarianMatcher, SetCriterion
    from dfx.tasks.detection import LossConfig, ModelConfig

    loss, model = LossConfig(), ModelConfig()
    criterion, matcher = SetCriterion(3), HungarianMatcher()
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (loss.cost_class, loss.cost_bbox,
                                                                          loss.cost_giou) == (2.0, 5.0, 2.0)
    assert criterion.weights == {"class": loss.class_weight, "l1": loss.bbox_weight, "giou": loss.giou_weight}
    assert (criterion.focal_alpha, criterion.focal_gamma) == (loss.focal_alpha, loss.focal_gamma) == (0.25, 2.0)
    assert (criterion.one2many_k, criterion.one2many_weight) == (model.one2many_k, model.one2many_weight) == (6, 1.0)
    built = SetCriterion.from_config(3, LossConfig(cost_bbox=1.0, class_weight=3.0), ModelConfig(one2many_k=2))
    assert (built.matcher.cost_bbox, built.weights["class"], built.one2many_k) == (1.0, 3.0, 2)


def test_bad_loss_value_exits_2_on_the_command_line():
    result = CliRunner().invoke(app, ["train", str(RECIPES / "hdetr-shapes.yaml"), "loss.cost_class=-1", "--dry-run"])
    assert result.exit_code == 2 and "loss.cost_class must be >= 0" in result.output


@pytest.mark.slow  # end-to-end training
def test_invalid_boxes_fail_early_or_are_skipped_and_counted(det_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(det_root, root)
    ann_file = root / "annotations" / "train.json"
    coco = json.loads(ann_file.read_text())
    coco["annotations"][0]["bbox"][2] = 0.0  # a box of zero width
    ann_file.write_text(json.dumps(coco))
    args = ["train", str(RECIPES / "hdetr-shapes.yaml"), f"data.root={root}", *TINY, "--device", "cpu", "--json",
            "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert "train.json" in error and "data.skip_invalid" in error
    result = CliRunner().invoke(app, [*args, "data.skip_invalid=true"])
    assert result.exit_code == 0, result.output
    assert "run_dir" in json.loads(result.stdout)  # stdout holds exactly the JSON summary
    assert "invalid box" in result.stderr
