"""MaskDINO's masks through dfx predict and dfx export: a tiny model of recipes/maskdino-shapes.yaml with
seeded random weights, on shapes-inst images."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfx.cli import app
from dfx.data.coco import decode_segmentations
from dfx.data.shapes_inst import generate_shapes_inst
from dfx.engine.checkpoint import save_weights
from dfx.engine.trainer import checkpoint_metadata
from dfx.models import build
from dfx.predict import draw_masks

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.classes=[circle,square,triangle,cross]", "model.backbone=resnet10t", "model.dim=32", "model.heads=4", "model.encoder_layers=1",
        "model.decoder_layers=2", "model.ffn_dim=64", "model.one2one_queries=10", "model.dn_queries=0",
        "data.scales=[64]", "data.max_size=64"]


@pytest.fixture(scope="module")
def maskdino(tmp_path_factory) -> tuple[Path, Path]:
    """(a dfx checkpoint of a tiny maskdino-shapes model, a shapes-inst root of 3 val images)."""
    root = tmp_path_factory.mktemp("maskdino")
    torch.manual_seed(0)
    resolved, task, model, _ = build(REPO / "recipes" / "maskdino-shapes.yaml", TINY)
    with torch.no_grad():  # every query confident, so that detections (and masks) pass the default threshold
        for head in model.class_heads:
            head.bias.fill_(3.0)
    weights = root / "maskdino.safetensors"
    save_weights(weights, model.state_dict(), checkpoint_metadata(resolved, task, 0, {}))
    generate_shapes_inst(root / "data", train_images=1, val_images=3)
    return weights, root / "data"


def test_draw_masks_tints_inside_and_outlines_the_edge():
    picture = np.zeros((6, 6, 3), dtype=np.uint8)
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 1:5, 1:5] = True
    drawn = draw_masks(picture, mask, alpha=0.5)
    colour = drawn[1, 1]
    assert colour.max() > 0 and (drawn[~mask[0]] == 0).all()  # outside untouched
    assert (drawn[2:4, 2:4] == np.round(colour.astype(float) * 0.5)).all()  # inside: half the colour
    edge = mask[0].copy()
    edge[2:4, 2:4] = False
    assert (drawn[edge] == colour).all()  # the outline: the colour itself


def test_predict_writes_masks_as_coco_segm_results_that_dfx_eval_scores(maskdino, tmp_path):
    weights, data = maskdino
    annotations = data / "annotations" / "val.json"
    result = CliRunner().invoke(app, ["predict", str(weights), str(data / "val"), "--annotations", str(annotations),
                                      "--out", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    segm = json.loads(Path(summary["segm_predictions"]).read_text())
    boxes = json.loads(Path(summary["predictions"]).read_text())
    lines = [json.loads(x) for x in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert len(segm) == len(boxes) == summary["detections"] == sum(len(x["detections"]) for x in lines) > 0
    for line in lines:
        for d in line["detections"]:
            mask = decode_segmentations([d["segmentation"]], line["height"], line["width"])[0]
            assert mask.shape == (256, 256) and mask.sum() == d["area"]
            assert 0 <= d["mask_score"] <= d["score"]  # class score x mean mask probability
    by_key = {(r["image_id"], r["segmentation"]["counts"]): r for r in segm}
    assert all((x["image_id"], d["segmentation"]["counts"]) in by_key for x in lines for d in x["detections"])
    scored = CliRunner().invoke(app, ["eval", "--predictions", summary["segm_predictions"], "--annotations",
                                      str(annotations), "--json"])
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout)
    assert report["iou_type"] == "segm" and report["detections"] == len(segm) and 0 <= report["metrics"]["AP"] <= 1
    assert Image.open(tmp_path / "p" / "images" / "000000.jpg").size == (256, 256)


needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
                                reason='onnx / onnxruntime not installed (pip install "dfx[export]")')


@needs_onnx
@pytest.mark.slow
def test_export_carries_the_mask_logits(maskdino):
    from dfx.export import export

    weights, data = maskdino
    # 128 px: the coarsest level (stride 64) keeps 2 x 2 cells, what its group norm needs to trace
    result = export(weights, image=data / "val" / "000000.png", dynamic_batch=True, image_size=[128, 128])
    check = result["check"]
    assert result["outputs"] == ["pred_logits", "pred_boxes", "pred_masks"]
    assert check["passed"] and {"pred_masks@batch1", "pred_masks@batch2"} <= set(check["per_output"])
    import onnxruntime

    session = onnxruntime.InferenceSession(result["file"])
    feed = {"images": np.zeros((2, 3, 128, 128), np.float32), "mask": np.zeros((2, 128, 128), bool)}
    logits, boxes, masks = session.run(None, feed)
    assert masks.shape == (2, 10, 32, 32) and logits.shape == (2, 10, 4)  # the 128 px input's stride-4 grid
