"""COCO box evaluation (pycocotools) and the detection plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfx.data.coco import quiet_coco
from dfx.data.coco_eval import STAT_NAMES, evaluate_coco, run_cocoeval, to_coco_results, write_results
from dfx.detection.plots import draw_predictions, plot_pr_curve

# three 200x200 images; medium boxes only (40x40 .. 90x90 px) of categories 3 ("a") and 8 ("b"), none large
GT_BOXES = {  # image id -> [(category id, [x, y, w, h])]
    1: [(3, [10, 10, 90, 90]), (8, [120, 20, 50, 60])],
    2: [(3, [50, 60, 80, 70])],
    3: [(8, [0, 100, 40, 40]), (3, [100, 100, 90, 90])],
}


@pytest.fixture
def coco_gt():
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in GT_BOXES]
    objects = [(i, c, box) for i, image_objects in GT_BOXES.items() for c, box in image_objects]
    annotations = [{"id": n, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
                   for n, (i, c, box) in enumerate(objects, 1)]
    return quiet_coco({"images": images, "annotations": annotations,
                       "categories": [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}]})


def results_of(shift: float = 0.0, categories=(3, 8)) -> list[dict]:
    """The ground truth as detections (score 1), boxes moved right by ``shift`` px."""
    return [{"image_id": i, "category_id": c, "bbox": [x + shift, y, w, h], "score": 1.0}
            for i, objects in GT_BOXES.items() for c, (x, y, w, h) in objects if c in categories]


def test_perfect_detections_score_one(coco_gt):
    metrics = evaluate_coco(coco_gt, results_of())
    for name in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100", "ARm"):
        assert metrics[name] == pytest.approx(1.0), name
    assert metrics["per_class"] == pytest.approx({"a": 1.0, "b": 1.0})


def test_undefined_metrics_are_zero_not_minus_one(coco_gt):
    metrics = evaluate_coco(coco_gt, results_of())
    assert set(STAT_NAMES) <= set(metrics)
    # no small or large ground truth: pycocotools says -1, dfx says 0.0
    assert (metrics["APs"], metrics["APl"], metrics["ARs"], metrics["ARl"]) == (0.0, 0.0, 0.0, 0.0)
    assert all(isinstance(metrics[name], float) and 0.0 <= metrics[name] <= 1.0 for name in STAT_NAMES)


def test_shifted_boxes_pass_iou_050_but_not_075(coco_gt):
    """Every box moved right by 20% of its width: IoU = 0.8 wh / 1.2 wh = 2/3 for each."""
    results = []
    for i, objects in GT_BOXES.items():
        for c, (x, y, w, h) in objects:
            results.append({"image_id": i, "category_id": c, "bbox": [x + 0.2 * w, y, w, h], "score": 1.0})
    metrics = evaluate_coco(coco_gt, results)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    # matched at IoU thresholds 0.50, 0.55, 0.60, 0.65 of the ten 0.50:0.05:0.95
    assert metrics["AP"] == pytest.approx(0.4)


def test_missing_class_scores_zero_in_per_class(coco_gt):
    metrics = evaluate_coco(coco_gt, results_of(categories=(3,)))
    assert metrics["per_class"] == pytest.approx({"a": 1.0, "b": 0.0})
    assert metrics["AP"] == pytest.approx(0.5)
    assert "per_class" not in evaluate_coco(coco_gt, results_of(), per_class=False)


def test_empty_results_give_zeros_and_a_usable_cocoeval(coco_gt, tmp_path):
    metrics, cocoeval = run_cocoeval(coco_gt, [])
    assert metrics == {name: 0.0 for name in STAT_NAMES}
    assert evaluate_coco(coco_gt, [])["per_class"] == {"a": 0.0, "b": 0.0}
    plot_pr_curve(cocoeval, tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 1000


def test_image_subset_and_unknown_ids(coco_gt):
    # detections only on image 2, evaluated on image 2 alone: perfect
    only_two = [r for r in results_of() if r["image_id"] == 2]
    assert evaluate_coco(coco_gt, only_two, image_ids=[2])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the ground truth: \\[99\\]"):
        run_cocoeval(coco_gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_results_are_not_modified(coco_gt):
    results = results_of()
    before = json.dumps(results)
    run_cocoeval(coco_gt, results)
    assert json.dumps(results) == before


def test_to_coco_results_converts_boxes_and_categories():
    results = to_coco_results(
        [5, 6],
        [torch.tensor([[10.123, 20.0, 30.0, 40.456], [0.0, 0.0, 1.0, 2.0]]), torch.zeros(0, 4)],
        [torch.tensor([0.9, 0.25]), torch.zeros(0)],
        [torch.tensor([1, 0]), torch.zeros(0, dtype=torch.long)],
        category_ids=[3, 8],
    )
    assert results == [
        {"image_id": 5, "category_id": 8, "bbox": [10.12, 20.0, 19.88, 20.46], "score": pytest.approx(0.9)},
        {"image_id": 5, "category_id": 3, "bbox": [0.0, 0.0, 1.0, 2.0], "score": pytest.approx(0.25)},
    ]
    values = [v for r in results for v in (r["image_id"], r["category_id"], r["score"], *r["bbox"])]
    assert all(type(v) in (int, float) for v in values)  # plain Python numbers: json.dump can write them


def test_round_trip_through_to_coco_results_is_perfect(coco_gt):
    image_ids, boxes, scores, labels = [], [], [], []
    for i, objects in GT_BOXES.items():
        image_ids.append(i)
        boxes.append(np.array([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], dtype=np.float32))
        scores.append(np.ones(len(objects)))
        labels.append(np.array([[3, 8].index(c) for c, _ in objects]))
    assert evaluate_coco(coco_gt, to_coco_results(image_ids, boxes, scores, labels, [3, 8]))["AP"] == pytest.approx(1.0)


def test_write_results_is_atomic_json(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_results(path, results_of())
    write_results(path, results_of(shift=1))
    assert json.loads(path.read_text()) == results_of(shift=1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary file left behind


def test_plots_write_png_files(coco_gt, tmp_path):
    _, cocoeval = run_cocoeval(coco_gt, results_of(shift=5) + results_of(shift=60))
    plot_pr_curve(cocoeval, tmp_path / "pr.png")
    images = [np.full((200, 200, 3), 90, dtype=np.uint8) for _ in range(3)]
    predictions = [{"boxes": torch.tensor([[10.0, 10, 110, 110], [0, 0, 5, 5]]), "scores": torch.tensor([0.9, 0.1]),
                    "labels": torch.tensor([0, 1])}] * 3
    targets = [{"boxes": np.array([[12.0, 8, 100, 100]]), "labels": np.array([0])}] * 3
    draw_predictions(images, predictions, ["a", "b"], tmp_path / "pred.png", targets=targets)
    for name in ("pr.png", "pred.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
