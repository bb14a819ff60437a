"""COCO box evaluation: detections -> COCO results -> pycocotools COCOeval -> named metrics.

The twelve numbers are COCOeval's ``stats`` in its order (:data:`STAT_NAMES`): AP averaged over
IoU 0.50:0.95, AP at IoU 0.50 and 0.75, AP for small / medium / large objects (area < 32², 32²-96²,
> 96² px), then recall at 1, 10 and 100 detections per image and per area. All are in [0, 1].
pycocotools reports -1 where a number is undefined (no ground truth in that area range, or no
ground truth at all); dfx reports 0.0 instead, so that every metric is a plain number that logs,
plots and compares ("best" checkpoint) without special cases.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from dfx.files import write_text_atomic

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(image_ids, boxes_xyxy_abs, scores, labels, category_ids) -> list[dict]:
    """Per-image detections as COCO results.

    ``image_ids``: B ints; ``boxes_xyxy_abs``: B arrays/tensors [N_i, 4] in pixels of the original
    image (xyxy); ``scores``: B [N_i]; ``labels``: B [N_i] contiguous labels, mapped to COCO ids by
    ``category_ids`` (label i -> category_ids[i]). Returns dicts ``{image_id, category_id,
    bbox: [x, y, w, h] (2 decimals), score}``.
    """
    results = []
    for image_id, boxes, image_scores, image_labels in zip(image_ids, boxes_xyxy_abs, scores, labels):
        boxes = np.asarray(to_numpy(boxes), dtype=np.float64).reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
        for box, score, label in zip(xywh.tolist(), to_numpy(image_scores).tolist(), to_numpy(image_labels).tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "bbox": box, "score": float(score)})
    return results


def to_numpy(values) -> np.ndarray:
    """A tensor (any device, any grad state), array or list as a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def run_cocoeval(coco_gt, results: list[dict], image_ids: list[int] | None = None):
    """Run pycocotools' bbox COCOeval quietly; returns ``(stats dict of STAT_NAMES, cocoeval)``.

    ``image_ids``: evaluate on these images only (default: every image of ``coco_gt``).
    Empty ``results`` evaluate as "nothing detected" (all zeros) rather than failing.
    """
    from pycocotools.cocoeval import COCOeval

    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results name image ids that are not in the ground truth: {sorted(unknown)[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        # loadRes adds fields (area, id, segmentation) to the dicts it is given: hand it copies
        detections = coco_gt.loadRes([dict(r) for r in results]) if results else empty_detections(coco_gt)
        cocoeval = COCOeval(coco_gt, detections, iouType="bbox")
        if image_ids is not None:
            cocoeval.params.imgIds = list(image_ids)
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    stats = {name: max(float(value), 0.0) for name, value in zip(STAT_NAMES, cocoeval.stats)}
    return stats, cocoeval


def empty_detections(coco_gt):
    """A COCO object with the ground truth's images and categories and no detections.

    ``loadRes([])`` fails (it inspects the first result), so "no detections" is built directly.
    """
    from dfx.data.coco import quiet_coco

    return quiet_coco({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": []})


def class_ap(cocoeval) -> dict[str, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) per category name; 0.0 where undefined."""
    precision = cocoeval.eval["precision"]  # [iou T, recall R, category K, area A, max dets M]
    out = {}
    for k, category_id in enumerate(cocoeval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        out[cocoeval.cocoGt.cats[category_id]["name"]] = float(values.mean()) if values.size else 0.0
    return out


def evaluate_coco(coco_gt, results: list[dict], per_class: bool = True, image_ids: list[int] | None = None) -> dict:
    """COCO box metrics: the twelve :data:`STAT_NAMES` as floats in [0, 1] (undefined -> 0.0),
    plus ``per_class`` {category name: AP} when asked. See :func:`run_cocoeval` for the arguments.
    """
    stats, cocoeval = run_cocoeval(coco_gt, results, image_ids)
    if per_class:
        stats["per_class"] = class_ap(cocoeval)
    return stats


def write_results(path: str | Path, results: list[dict]) -> None:
    """Write COCO results as JSON atomically: a reader sees the old file or the new one, never half."""
    write_text_atomic(path, json.dumps(results))
