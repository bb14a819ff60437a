"""Keypoint evaluation: dfx eval --predictions scores COCO keypoint results as pycocotools' COCOeval
(iouType="keypoints") does, with COCO's 17 sigmas or the dataset's / the command line's for any K;
OKS agrees with a direct computation."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dfx.cli import app
from dfx.data.coco_eval import KEYPOINT_STAT_NAMES
from dfx.data.keypoints import COCO_KEYPOINTS, COCO_SIGMAS, flip_permutation, oks, resolve_sigmas

FIVE = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]
FIVE_SIGMAS = [0.05, 0.08, 0.08, 0.1, 0.1]


def ground_truth(tmp_path: Path, names, sigmas=None, images=6, seed=0) -> Path:
    """Images with two or three people each; visibility mixes 2, 1 and 0; one crowd region."""
    rng = np.random.default_rng(seed)
    k = len(names)
    annotations = []
    for image in range(1, images + 1):
        for _ in range(rng.integers(2, 4)):
            x, y, w, h = rng.uniform(0, 150), rng.uniform(0, 150), rng.uniform(30, 120), rng.uniform(40, 140)
            v = rng.choice([0, 1, 2], size=k, p=[0.15, 0.25, 0.6])
            points = np.stack([x + rng.uniform(0, w, k), y + rng.uniform(0, h, k), v], 1)
            points[v == 0, :2] = 0
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h * 0.7, "iscrowd": 0,
                                "num_keypoints": int((v > 0).sum()), "keypoints": points.round(2).ravel().tolist()})
    annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": 1, "bbox": [200, 200, 50, 50],
                        "area": 2500.0, "iscrowd": 1, "num_keypoints": 0, "keypoints": [0] * (3 * k)})
    category = {"id": 1, "name": "person", "keypoints": list(names), "skeleton": [[1, 2]]}
    if sigmas is not None:
        category["sigmas"] = list(sigmas)
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 300, "height": 300} for i in range(1, images + 1)],
            "annotations": annotations, "categories": [category]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def noisy_results(annotations: Path, seed=1) -> list[dict]:
    """Each person found with its keypoints moved by a few pixels (more for some), plus false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for a in json.loads(annotations.read_text())["annotations"]:
        if a["iscrowd"]:
            continue
        points = np.asarray(a["keypoints"], dtype=float).reshape(-1, 3)
        points[:, :2] += rng.normal(0, rng.choice([1.0, 4.0, 12.0]), size=(len(points), 2))
        points[:, 2] = 1
        out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": points.round(2).ravel().tolist(),
                    "score": float(rng.uniform(0.3, 1.0))})
        if rng.uniform() < 0.4:  # a false positive elsewhere
            points[:, :2] = rng.uniform(0, 300, size=(len(points), 2))
            out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": points.round(2).ravel().tolist(),
                        "score": float(rng.uniform(0.0, 0.8))})
    return out


def evaluate(tmp_path: Path, results, annotations: Path, *extra: str):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    result = CliRunner().invoke(app, ["eval", "--predictions", str(path), "--annotations", str(annotations),
                                      "--json", *extra])
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


def pycocotools_stats(annotations: Path, results: list[dict], sigmas=None) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        cocoeval = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="keypoints")
        if sigmas is not None:
            cocoeval.params.kpt_oks_sigmas = np.asarray(sigmas)
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return np.maximum(cocoeval.stats, 0.0)


def test_coco_person_keypoints_score_as_pycocotools(tmp_path):
    annotations = ground_truth(tmp_path, COCO_KEYPOINTS)
    results = noisy_results(annotations)
    code, payload = evaluate(tmp_path, results, annotations)
    assert code == 0 and payload["iou_type"] == "keypoints" and payload["sigmas"] == pytest.approx(COCO_SIGMAS)
    expected = pycocotools_stats(annotations, results)
    assert 0.2 < expected[0] < 0.95  # a result that is neither perfect nor empty
    assert [payload["metrics"][name] for name in KEYPOINT_STAT_NAMES] == pytest.approx(expected.tolist(), abs=1e-12)


def test_ground_truth_keypoints_score_ap_one(tmp_path):
    annotations = ground_truth(tmp_path, FIVE, FIVE_SIGMAS)
    exact = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
             for a in json.loads(annotations.read_text())["annotations"] if not a["iscrowd"]]
    code, payload = evaluate(tmp_path, exact, annotations)
    assert code == 0 and payload["metrics"]["AP"] == pytest.approx(1.0) and payload["metrics"]["AR"] == 1.0


def test_any_keypoint_count_uses_the_categorys_sigmas_or_the_given_ones(tmp_path):
    annotations = ground_truth(tmp_path, FIVE, FIVE_SIGMAS)
    results = noisy_results(annotations)
    code, payload = evaluate(tmp_path, results, annotations)
    assert code == 0 and payload["sigmas"] == FIVE_SIGMAS
    expected = pycocotools_stats(annotations, results, FIVE_SIGMAS)
    assert [payload["metrics"][name] for name in KEYPOINT_STAT_NAMES] == pytest.approx(expected.tolist(), abs=1e-12)
    wide = [0.3] * 5  # looser sigmas forgive the noise: a higher AP, as pycocotools computes it
    code, payload = evaluate(tmp_path, results, annotations, "--sigmas", ",".join(map(str, wide)))
    expected_wide = pycocotools_stats(annotations, results, wide)
    assert code == 0 and payload["metrics"]["AP"] == pytest.approx(expected_wide[0]) and expected_wide[0] > expected[0]


def test_keypoints_without_sigmas_are_refused_with_the_fix(tmp_path):
    annotations = ground_truth(tmp_path, FIVE)  # no sigmas in the category
    code, payload = evaluate(tmp_path, noisy_results(annotations), annotations)
    assert code == 2 and "5 keypoints per instance, and no sigmas" in payload["error"]
    assert "--sigmas" in payload["error"]
    code, payload = evaluate(tmp_path, noisy_results(annotations), annotations, "--sigmas", "0.1,0.1")
    assert code == 2 and "2 values for 5 keypoints" in payload["error"]
    code, payload = evaluate(tmp_path, noisy_results(annotations), annotations, "--sigmas", "0.1,x")
    assert code == 2 and "--sigmas" in payload["error"]


def test_oks_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    predicted, truth = rng.uniform(0, 100, (4, 5, 2)), rng.uniform(0, 100, (3, 5, 2))
    truth[1] = predicted[2] + rng.normal(0, 2, (5, 2))
    visibility = rng.choice([0, 1, 2], size=(3, 5))
    visibility[:, 0] = 2
    area = rng.uniform(500, 5000, 3)
    sigmas = np.array(FIVE_SIGMAS)
    direct = np.zeros((4, 3))
    for n in range(4):
        for m in range(3):
            terms = [np.exp(-np.sum((predicted[n, i] - truth[m, i]) ** 2) / (2 * area[m] * (2 * sigmas[i]) ** 2))
                     for i in range(5) if visibility[m, i] > 0]
            direct[n, m] = sum(terms) / len(terms)
    assert oks(predicted, truth, visibility, area, sigmas) == pytest.approx(direct, rel=1e-9)
    as_torch = oks(torch.tensor(predicted, dtype=torch.float32), torch.tensor(truth), torch.tensor(visibility),
                   torch.tensor(area), torch.tensor(sigmas))
    assert as_torch.dtype == torch.float32 and as_torch.numpy() == pytest.approx(direct, rel=1e-4)
    assert direct[2, 1] > 0.5 > direct[0, 0]


def test_resolve_sigmas_and_flip_permutation():
    assert resolve_sigmas(17) == COCO_SIGMAS
    assert resolve_sigmas(5, category={"sigmas": FIVE_SIGMAS}) == tuple(FIVE_SIGMAS)
    with pytest.raises(ValueError, match="must be positive"):
        resolve_sigmas(2, given=[0.1, -1])
    assert flip_permutation(FIVE) == [0, 2, 1, 4, 3]
    assert flip_permutation(COCO_KEYPOINTS)[:5] == [0, 2, 1, 4, 3]
    assert flip_permutation(FIVE, [[3, 4]]) == [0, 1, 2, 4, 3]
