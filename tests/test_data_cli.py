"""`dfx data check`, `dfx eval --predictions --annotations`, training on YOLO and VOC data, TensorBoard."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from shared_data import DATA, needs
from typer.testing import CliRunner

from dfx.cli import app
from dfx.engine import train
from dfx.errors import UsageError

REFERENCE = DATA / "coco-eval-reference"
CHESS = DATA / "chess-pieces-coco"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def reference_numbers() -> list[float]:
    """The twelve bbox numbers pycocotools documents for its demo (val2014_fake_eval_res.txt)."""
    text = (REFERENCE / "val2014_fake_eval_res.txt").read_text()
    section = text.split("type=bbox")[1].split("type=keypoints")[0]
    return [float(v) for v in re.findall(r"\] = (-?[0-9.]+)", section)]


@needs("coco-eval-reference")
def test_eval_of_a_results_file_reproduces_pycocotools_reference():
    result = CliRunner().invoke(app, ["eval", "--predictions", str(REFERENCE / "instances_val2014_fakebbox100_results.json"),
                                      "--annotations", str(REFERENCE / "instances_val2014_100.json"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert [round(payload["metrics"][k], 3) for k in names] == reference_numbers()
    assert reference_numbers()[:2] == [0.505, 0.697]
    assert payload["images"] == 100 and payload["detections"] > 0


@needs("coco-eval-reference")
def test_eval_of_a_results_file_rejects_foreign_ids(tmp_path):
    results = json.loads((REFERENCE / "instances_val2014_fakebbox100_results.json").read_text())
    results[0]["image_id"] = 123456789
    (tmp_path / "r.json").write_text(json.dumps(results))
    annotations = str(REFERENCE / "instances_val2014_100.json")
    result = CliRunner().invoke(app, ["eval", "--predictions", str(tmp_path / "r.json"), "--annotations", annotations])
    assert result.exit_code == 2
    assert "1 of " in result.output and "123456789" in result.output and "--annotations" in result.output
    result = CliRunner().invoke(app, ["eval", "--predictions", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "--predictions and --annotations go together" in result.output


@needs("chess-pieces-coco")
def test_data_check_reports_the_chess_export():
    result = CliRunner().invoke(app, ["data", "check", str(CHESS), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["format"] == "coco-export" and len(report["classes"]) == 13
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert (train["images"], train["boxes"], val["images"], val["boxes"]) == (202, 2108, 58, 386)
    assert train["boxes_per_class"]["bishop"] == 1 and val["boxes_per_class"]["bishop"] == 0
    assert train["image_sizes"] == {"2048x1371": 202}
    assert [(p["split"], p["kind"], p["fatal"]) for p in report["problems"]] == [
        ("val", "no ground truth", False), ("test", "no ground truth", False)]


def broken_export(root: Path) -> Path:
    """A COCO export with a missing image, a cut-off image and a box reaching outside its image."""
    from PIL import Image

    (root / "train").mkdir(parents=True)
    (root / "valid").mkdir()
    for split in ("train", "valid"):
        for i in range(3):
            Image.new("RGB", (50, 40), (i * 60, 0, 0)).save(root / split / f"{i}.jpg")
    data = (root / "train" / "2.jpg").read_bytes()
    (root / "train" / "2.jpg").write_bytes(data[: len(data) // 2])
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 50, "height": 40} for i in range(4)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20]} for i in range(3)]
    annotations.append({"id": 9, "image_id": 0, "category_id": 2, "bbox": [40, 30, 20, 20]})
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(
        {"images": images[:3], "annotations": annotations[:3], "categories": categories}))
    return root


def test_data_check_finds_every_problem_and_fails(tmp_path):
    root = broken_export(tmp_path / "broken")
    result = CliRunner().invoke(app, ["data", "check", str(root), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    problems = {(p["split"], p["kind"]): p for p in report["problems"]}
    assert problems[("train", "annotations")]["fatal"] and "1 of 4 images listed" in \
        problems[("train", "annotations")]["detail"]
    assert problems[("train", "missing image file")]["count"] == 1
    assert problems[("train", "unreadable image")]["fatal"] and "2.jpg (truncated file)" in \
        problems[("train", "unreadable image")]["detail"]
    assert problems[("train", "box outside image")]["count"] == 1
    assert problems[("train", "empty class")]["detail"].startswith("no boxes of c in train")
    # with skip_invalid the missing and the cut-off image are dropped: training would run
    result = CliRunner().invoke(app, ["data", "check", str(root), "data.skip_invalid=true", "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["ok"] and report["splits"]["train"]["images"] == 2
    human = CliRunner().invoke(app, ["data", "check", str(root)])
    assert human.exit_code == 1 and "training would fail on this data" in human.output


def test_data_check_on_a_folder_in_no_format(tmp_path):
    (tmp_path / "photos").mkdir()
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "photos")])
    assert result.exit_code == 2 and "no known detection format" in result.output


TINY = ["model.backbone=resnet10t", "model.dim=32", "model.heads=4", "model.encoder_layers=1",
        "model.decoder_layers=1", "model.ffn_dim=64", "model.one2one_queries=10", "model.one2many_queries=20",
        "model.one2many_k=2", "data.scales=[64]", "data.max_size=96", "data.crop=null", "train.epochs=1",
        "train.batch_size=2", "train.num_workers=0", "train.warmup_steps=0", "eval.batch_size=4",
        "eval.draw_images=1"]


@pytest.mark.slow
@needs("chess-pieces-coco")
@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_chess_as_yolo_and_voc_trains_and_evaluates(tmp_path, fmt):
    from test_formats import write_voc, write_yolo

    root = write_yolo(tmp_path / "d", limit=4) if fmt == "yolo" else write_voc(tmp_path / "d", limit=4)
    result = train(RECIPES / "hdetr-shapes.yaml", [f"data.root={root}", *TINY], out=tmp_path / "run", device="cpu",
                   quiet=True)
    metrics = result["metrics"]
    assert 0.0 <= metrics["AP"] <= 1.0 and "AP/bishop" not in metrics  # no bishop among these val images
    assert sum(k.startswith("AP/") for k in metrics) >= 5
    run_dir = Path(result["run_dir"])
    ground_truth = json.loads((run_dir / "annotations.json").read_text())  # the converted val split, for others
    assert len(ground_truth["images"]) == 4
    evaluated = CliRunner().invoke(app, ["eval", "--predictions", str(run_dir / "predictions.json"),
                                         "--annotations", str(run_dir / "annotations.json"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["metrics"]["AP"] == pytest.approx(metrics["AP"])


def test_tensorboard_missing_is_a_clear_error_before_any_run(tmp_path, monkeypatch, tiny_recipe):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UsageError, match=r'train.tensorboard: true needs the tensorboard package; pip install '
                                         r'"dfx\[tensorboard\]"'):
        train(tiny_recipe, ["train.tensorboard=true"], out=tmp_path / "run", device="cpu", quiet=True)
    assert not (tmp_path / "run").exists()


def test_tensorboard_logs_the_run(tmp_path, tiny_recipe):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_recipe, ["train.tensorboard=true", "train.epochs=1"], out=tmp_path / "run", device="cpu",
                   quiet=True)
    events = EventAccumulator(str(Path(result["run_dir"]) / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "val/top1", "step/loss", "step/lr"} <= set(tags)
    assert events.Scalars("val/top1")[0].value == pytest.approx(result["metrics"]["top1"])
