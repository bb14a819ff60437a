"""Panoptic quality against hand-made cases and a direct restatement; MaskDINO's panoptic and semantic inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfx.data.panoptic_eval import PanopticQuality, id_to_rgb, rgb_to_id
from dfx.detection.panoptic import panoptic_inference, semantic_inference, sharpened_scores
from dfx.errors import UsageError

CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}]


def segments(ids: np.ndarray, categories: dict[int, int], crowd=()) -> list[dict]:
    return [{"id": i, "category_id": c, "iscrowd": int(i in crowd), "area": int((ids == i).sum())}
            for i, c in categories.items()]


def columns(spans: dict[int, tuple[int, int]], width: int = 20) -> np.ndarray:
    """A 10 x width id map: segment id over its [start, stop) columns, 0 elsewhere."""
    ids = np.zeros((10, width), dtype=np.int64)
    for segment_id, (start, stop) in spans.items():
        ids[:, start:stop] = segment_id
    return ids


def test_matches_at_iou_above_half_things_and_stuff_apart():
    gt = columns({1: (0, 10), 2: (10, 20)})
    pred = columns({5: (0, 8), 6: (8, 20)})  # IoU 80/100 and 100/120
    pq = PanopticQuality(CATEGORIES)
    pq.add(gt, segments(gt, {1: 1, 2: 2}), pred, [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 2}])
    out = pq.summary()
    assert out["PQ_th"] == pytest.approx(0.8) and out["PQ_st"] == pytest.approx(100 / 120)
    assert out["PQ"] == pytest.approx((0.8 + 100 / 120) / 2) and out["RQ"] == 1.0 and out["n"] == 2
    assert out["SQ"] == pytest.approx(out["PQ"])


def test_void_pixels_leave_the_union_and_a_prediction_mostly_on_void_is_ignored():
    gt = columns({1: (0, 10)})  # columns 10-19 void
    pred = columns({3: (0, 15), 4: (15, 20)})
    pq = PanopticQuality(CATEGORIES)
    pq.add(gt, segments(gt, {1: 1}), pred, [{"id": 3, "category_id": 1}, {"id": 4, "category_id": 2}])
    out = pq.summary()
    assert out["PQ"] == pytest.approx(1.0) and out["n"] == 1 and out["n_st"] == 0  # 4 is no false positive


def test_crowd_regions_never_match_and_excuse_predictions_of_their_category():
    gt = columns({1: (0, 10), 2: (10, 20)})
    pred = columns({7: (0, 10), 8: (10, 14)})
    pq = PanopticQuality(CATEGORIES)
    pq.add(gt, segments(gt, {1: 1, 2: 1}, crowd={1}), pred, [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 1}])
    stat = pq.stats[1]
    assert (stat.tp, stat.fp, stat.fn) == (0, 1, 1)  # 7 sits on the crowd: ignored; 8 has IoU 0.4
    assert pq.summary()["PQ"] == 0.0
    other = PanopticQuality(CATEGORIES)  # of another category, the same prediction is a false positive
    other.add(gt, segments(gt, {1: 1, 2: 1}, crowd={1}), pred, [{"id": 7, "category_id": 2}, {"id": 8, "category_id": 1}])
    assert other.stats[2].fp == 1


def direct_stats(images, categories):
    """The definition restated with one boolean mask per segment pair."""
    stats = {c["id"]: [0, 0, 0, 0.0] for c in categories}  # tp, fp, fn, iou
    for gt, gt_segments, pred, pred_segments in images:
        matched_gt, matched_pred = set(), set()
        for g in gt_segments:
            for p in pred_segments:
                if g["iscrowd"] or g["category_id"] != p["category_id"]:
                    continue
                mine, theirs = gt == g["id"], pred == p["id"]
                inter = (mine & theirs).sum()
                union = g["area"] + theirs.sum() - inter - (theirs & (gt == 0)).sum()
                if inter / union > 0.5:
                    stats[g["category_id"]][0] += 1
                    stats[g["category_id"]][3] += inter / union
                    matched_gt.add(g["id"])
                    matched_pred.add(p["id"])
        for g in gt_segments:
            if g["id"] not in matched_gt and not g["iscrowd"]:
                stats[g["category_id"]][2] += 1
        for p in pred_segments:
            if p["id"] in matched_pred:
                continue
            theirs = pred == p["id"]
            crowd = np.zeros_like(theirs)
            for g in gt_segments:
                if g["iscrowd"] and g["category_id"] == p["category_id"]:
                    crowd |= gt == g["id"]
            if ((theirs & ((gt == 0) | crowd)).sum()) / theirs.sum() <= 0.5:
                stats[p["category_id"]][1] += 1
    return stats


@pytest.mark.parametrize("seed", range(4))
def test_random_scenes_agree_with_the_direct_restatement(seed):
    rng = np.random.default_rng(seed)
    categories = [{"id": c, "isthing": int(c < 4)} for c in (1, 2, 3, 4, 5)]
    pq, images = PanopticQuality(categories), []
    for _ in range(6):
        gt = rng.integers(0, 7, size=(16, 16))  # 0 void, then segments 1-6 as random blocks
        gt = np.kron(gt[::4, ::4], np.ones((4, 4), dtype=np.int64))
        present = [int(i) for i in np.unique(gt) if i]
        cats = {i: int(rng.integers(1, 6)) for i in present}
        crowd = {i for i in present if rng.uniform() < 0.2 and cats[i] not in
                 {cats[j] for j in present if j < i}}  # at most one crowd region per category
        gt_segments = segments(gt, cats, crowd)
        pred = np.where(rng.uniform(size=gt.shape) < 0.3, rng.integers(0, 7, size=gt.shape), gt) * 3 + 1
        pred[pred == 1] = 0  # void where the ground truth / noise says 0
        present_pred = [int(i) for i in np.unique(pred) if i]
        pred_segments = [{"id": i, "category_id": cats.get((i - 1) // 3, int(rng.integers(1, 6)))
                          if rng.uniform() < 0.8 else int(rng.integers(1, 6))} for i in present_pred]
        pq.add(gt, gt_segments, pred, pred_segments)
        images.append((gt, gt_segments, pred, pred_segments))
    want = direct_stats(images, categories)
    for c, (tp, fp, fn, iou) in want.items():
        stat = pq.stats[c]
        assert (stat.tp, stat.fp, stat.fn) == (tp, fp, fn) and stat.iou == pytest.approx(iou)
    assert sum(s.tp for s in pq.stats.values()) > 0 and sum(s.fp + s.fn for s in pq.stats.values()) > 0


def test_bad_predictions_are_named():
    gt = columns({1: (0, 10)})
    pq = PanopticQuality(CATEGORIES)
    with pytest.raises(UsageError, match="segments_info does not list"):
        pq.add(gt, segments(gt, {1: 1}), columns({3: (0, 5)}), [], image="a.png")
    with pytest.raises(UsageError, match="no pixel"):
        pq.add(gt, segments(gt, {1: 1}), columns({}), [{"id": 3, "category_id": 1}], image="a.png")
    with pytest.raises(UsageError, match="category 9"):
        pq.add(gt, segments(gt, {1: 1}), columns({3: (0, 5)}), [{"id": 3, "category_id": 9}], image="a.png")


def test_png_ids_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 16777215]])
    assert (rgb_to_id(id_to_rgb(ids)) == ids).all() and id_to_rgb(ids)[1, 0].tolist() == [0, 1, 0]


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_panoptic_inference_keeps_confident_queries_merges_stuff_and_drops_overlapped():
    """Classes 0 (thing) and 1 (stuff) on a 4 x 8 image; mask logits +-6 (probabilities 0.998 / 0.002)."""
    masks = torch.full((5, 4, 8), -6.0)
    masks[0, :, 0:2] = 6  # thing, confident
    masks[1, :, 2:4] = 6  # stuff
    masks[2, :, 4:6] = 6  # the same stuff class: merged into query 1's segment
    masks[3, :, 6:8] = 6  # a thing below the object threshold: dropped
    masks[4, :, 0:3] = 6  # a weaker thing mostly under query 0's mask: loses 2 of its 3 columns, dropped
    classes = torch.full((5, 2), -8.0)
    classes[0, 0], classes[1, 1], classes[2, 1], classes[3, 0], classes[4, 0] = (logit(0.9), logit(0.8), logit(0.7),
                                                                               logit(0.2), logit(0.5))
    ids, info = panoptic_inference(classes, masks, thing_classes={0})
    assert info == [{"id": 1, "category_id": 0, "isthing": True}, {"id": 2, "category_id": 1, "isthing": False}]
    assert ids[0].tolist() == [1, 1, 2, 2, 2, 2, 0, 0]
    alone = panoptic_inference(classes[[4]], masks[[4]], thing_classes={0})  # without query 0 it stands
    assert alone[0][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    none = panoptic_inference(classes[[3]], masks[[3]], thing_classes={0})
    assert none[1] == [] and int(none[0].abs().sum()) == 0


def test_semantic_inference_sums_sharpened_scores_times_mask_probabilities():
    torch.manual_seed(0)
    classes, masks = torch.randn(6, 3), torch.randn(6, 5, 7)
    scores = sharpened_scores(classes)
    assert torch.allclose(scores.sum(-1), torch.ones(6))
    assert torch.allclose(scores, torch.softmax(classes.sigmoid() / 0.06, -1))
    semantic = semantic_inference(classes, masks)
    direct = sum(scores[q][:, None, None] * masks[q].sigmoid()[None] for q in range(6))
    assert semantic.shape == (3, 5, 7) and torch.allclose(semantic, direct, atol=1e-6)


def test_dfx_eval_scores_a_coco_panoptic_prediction_by_pq(tmp_path):
    """COCO panoptic JSON + PNG folders on both sides: the files give the same PQ as the ids they encode."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from dfx.cli import app

    gt = columns({1: (0, 10), 70000: (10, 20)})  # an id above 65535 exercises the blue channel
    pred = columns({5: (0, 8), 6: (8, 20)})
    for name, ids, info in (("gt", gt, segments(gt, {1: 1, 70000: 2})),
                            ("pred", pred, [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 2}])):
        (tmp_path / name).mkdir()
        Image.fromarray(id_to_rgb(ids)).save(tmp_path / name / "a.png")
        document = {"annotations": [{"image_id": 3, "file_name": "a.png", "segments_info": info}]}
        if name == "gt":
            document["categories"] = [{**c, "name": n} for c, n in zip(CATEGORIES, ("cat", "sky"))]
            document["images"] = [{"id": 3, "file_name": "a.jpg", "width": 20, "height": 10}]
        (tmp_path / f"{name}.json").write_text(json.dumps(document))
    result = CliRunner().invoke(app, ["eval", "--predictions", str(tmp_path / "pred.json"), "--annotations",
                                      str(tmp_path / "gt.json"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["iou_type"] == "panoptic" and report["detections"] == 2 and report["images"] == 1
    assert report["metrics"]["PQ"] == pytest.approx((0.8 + 100 / 120) / 2)
    assert report["metrics"]["PQ/sky"] == pytest.approx(100 / 120)
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": [{"image_id": 4, "file_name": "a.png",
                                                                     "segments_info": []}]}))
    missing = CliRunner().invoke(app, ["eval", "--predictions", str(tmp_path / "pred.json"), "--annotations",
                                       str(tmp_path / "gt.json")])
    assert missing.exit_code == 2 and "no prediction for 1 of 1 images" in missing.output
