"""predict, eval --predictions and export of a pose model (random seeded weights of
recipes/pose-shapes.yaml made small) on a few generated shapes-pose images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dfx.cli import app
from dfx.data.shapes_pose import KEYPOINTS, generate_shapes_pose
from dfx.engine.checkpoint import save_weights
from dfx.engine.trainer import checkpoint_metadata
from dfx.models import build

REPO = Path(__file__).resolve().parents[1]
SMALL = ("model.encoder_layers=1", "model.decoder_layers=3", "model.one2one_queries=12", "model.pose_groups=4",
         "data.scales=[96]", "data.max_size=128",
         "data.classes=[figure]")


@pytest.fixture(scope="module")
def pose_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pose")
    generate_shapes_pose(folder / "data", train_images=4, val_images=3)
    torch.manual_seed(0)
    resolved, task, model, _ = build(REPO / "recipes" / "pose-shapes.yaml", [f"data.root={folder / 'data'}", *SMALL])
    path = folder / "pose.safetensors"
    save_weights(path, model.state_dict(), checkpoint_metadata(resolved, task, 0, {}))
    return path, folder / "data"


@pytest.mark.slow
def test_predict_writes_keypoint_results_that_eval_scores_as_keypoints(pose_run, tmp_path):
    weights, data = pose_run
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(weights), str(data / "val"), "--annotations",
                                      str(data / "annotations" / "val.json"), "--conf", "0", "--out", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == 3 * 4 and all(len(r["keypoints"]) == 3 * len(KEYPOINTS) for r in results)
    line = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert len(line["detections"][0]["keypoints"]) == 3 * len(KEYPOINTS)
    xs = [v for r in results for v in r["keypoints"][0::3]]
    assert 0 <= min(xs) and max(xs) <= 256 and max(xs) > 96  # in the 256 px image's pixels, not the input's
    scored = CliRunner().invoke(app, ["eval", "--predictions", str(out / "predictions.json"), "--annotations",
                                      str(data / "annotations" / "val.json"), "--json"])
    payload = json.loads(scored.stdout)
    assert scored.exit_code == 0 and payload["iou_type"] == "keypoints" and len(payload["sigmas"]) == len(KEYPOINTS)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_export_carries_keypoints(pose_run, tmp_path):
    weights, _ = pose_run
    result = CliRunner().invoke(app, ["export", str(weights), "--out", str(tmp_path / "pose.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["outputs"] == ["pred_logits", "pred_boxes", "pred_keypoints"] and payload["check"]["passed"]
