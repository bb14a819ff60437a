"""dfx eval --predictions: the IoU type comes from the entries, is named in the output, and a results
file that cannot be scored as it says is refused (exit 2) instead of scored as something else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shared_data import DATA, needs
from typer.testing import CliRunner

from dfx.cli import app

REFERENCE = DATA / "coco-eval-reference"
INSTANCES = REFERENCE / "instances_val2014_100.json"
KEYPOINT_NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle"]


def evaluate(tmp_path: Path, results, annotations: Path, *extra: str):
    """(exit code, the one JSON object printed, stderr) of dfx eval --predictions on ``results``."""
    path = tmp_path / "results.json"
    path.write_text(results if isinstance(results, str) else json.dumps(results))
    result = CliRunner().invoke(app, ["eval", "--predictions", str(path), "--annotations", str(annotations),
                                      "--json", *extra])
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.output  # exactly one JSON object, success or error
    return result.exit_code, json.loads(lines[0]), result.stderr


def instances() -> dict:
    return json.loads(INSTANCES.read_text())


def people(tmp_path: Path) -> Path:
    """Three 200x200 images with one person each: box, area and the 17 COCO keypoints."""
    rng = np.random.default_rng(0)
    annotations = []
    for i in (1, 2, 3):
        x, y = rng.uniform(20, 60, size=2)
        points = np.stack([x + rng.uniform(0, 100, 17), y + rng.uniform(0, 120, 17), np.full(17, 2)], 1)
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [x, y, 100, 120], "area": 9000.0,
                            "iscrowd": 0, "num_keypoints": 17, "keypoints": points.round(1).ravel().tolist()})
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2, 3)],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "keypoints": KEYPOINT_NAMES, "skeleton": []}]}
    path = tmp_path / "person_keypoints.json"
    path.write_text(json.dumps(data))
    return path


@needs("coco-eval-reference")
def test_box_results_name_their_iou_type(tmp_path):
    boxes = [{k: a[k] for k in ("image_id", "category_id", "bbox")} | {"score": 1.0}
             for a in instances()["annotations"] if not a["iscrowd"]]
    code, payload, _ = evaluate(tmp_path, boxes, INSTANCES)
    assert code == 0 and payload["iou_type"] == "bbox" and payload["metrics"]["AP"] == pytest.approx(1.0)


@needs("coco-eval-reference")
def test_masks_are_scored_as_masks_not_as_the_boxes_beside_them(tmp_path):
    data = instances()
    size = {im["id"]: [im["height"], im["width"]] for im in data["images"]}
    kept = [a for a in data["annotations"] if not a["iscrowd"]]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": 1.0} for a in kept]
    code, payload, _ = evaluate(tmp_path, perfect, INSTANCES)
    assert code == 0 and payload["iou_type"] == "segm" and payload["metrics"]["AP"] == pytest.approx(1.0)
    # exact boxes with empty masks: 0 as masks (before: the boxes were scored, AP 0.276)
    empty = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
              "segmentation": {"size": size[a["image_id"]], "counts": [size[a["image_id"]][0] * size[a["image_id"]][1]]}}
             for a in kept]
    code, payload, _ = evaluate(tmp_path, empty, INSTANCES)
    assert code == 0 and payload["iou_type"] == "segm" and payload["metrics"]["AP"] == 0.0


def test_masks_against_annotations_without_masks_are_refused(tmp_path):
    annotations = people(tmp_path)
    masks = [{"image_id": 1, "category_id": 1, "segmentation": [[10, 10, 60, 10, 60, 60]], "score": 0.9}]
    code, payload, _ = evaluate(tmp_path, masks, annotations)
    assert code == 2 and payload["exit_code"] == 2
    assert "segmentation results but 3 of 3 annotations have no segmentation" in payload["error"]


def test_keypoints_are_scored_with_oks(tmp_path):
    annotations = people(tmp_path)
    truth = json.loads(annotations.read_text())["annotations"]
    exact = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0} for a in truth]
    code, payload, _ = evaluate(tmp_path, exact, annotations)
    assert code == 0 and payload["iou_type"] == "keypoints" and payload["metrics"]["AP"] == pytest.approx(1.0)
    assert set(payload["metrics"]) >= {"AP", "AP50", "AR", "ARm"} and "AR100" not in payload["metrics"]
    # exact boxes, keypoints moved by 30 px: as boxes this scored 1.000; as keypoints it is poor
    moved = [{**r, "bbox": a["bbox"], "keypoints": [v + 30 if i % 3 < 2 else v for i, v in enumerate(r["keypoints"])]}
             for r, a in zip(exact, truth)]
    code, payload, _ = evaluate(tmp_path, moved, annotations)
    assert code == 0 and payload["iou_type"] == "keypoints" and payload["metrics"]["AP"] < 0.2


@needs("coco-eval-reference")
def test_keypoints_against_annotations_without_keypoints_are_refused(tmp_path):
    first = next(a for a in instances()["annotations"] if a["category_id"] == 1)
    result = [{"image_id": first["image_id"], "category_id": 1, "bbox": first["bbox"], "score": 1.0,
               "keypoints": [10.0, 10.0, 2] * 17}]
    code, payload, _ = evaluate(tmp_path, result, INSTANCES)
    assert code == 2 and "keypoint results but the annotations have no keypoints" in payload["error"]


def test_a_keypoint_count_other_than_the_annotations_is_refused(tmp_path):
    result = [{"image_id": 1, "category_id": 1, "keypoints": [10.0, 10.0, 2] * 5, "score": 1.0}]
    code, payload, _ = evaluate(tmp_path, result, people(tmp_path))
    assert code == 2 and "[5] per result and [17] per annotation" in payload["error"]


def test_an_empty_list_warns_and_strict_refuses(tmp_path):
    annotations = people(tmp_path)
    code, payload, stderr = evaluate(tmp_path, [], annotations)
    assert code == 0 and payload["metrics"]["AP"] == 0.0 and "empty list" in stderr and "every metric is 0" in stderr
    code, payload, _ = evaluate(tmp_path, [], annotations, "--strict")
    assert code == 2 and "empty list" in payload["error"] and "--strict" in payload["error"]


def test_a_mix_of_types_is_refused(tmp_path):
    mixed = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5},
             {"image_id": 1, "category_id": 1, "keypoints": [10.0, 10.0, 2] * 17, "score": 0.5}]
    code, payload, _ = evaluate(tmp_path, mixed, people(tmp_path))
    assert code == 2 and "mixes entry types: 1 bbox (first: [0]), 1 keypoints (first: [1])" in payload["error"]
