"""COCO box and mask evaluation: detections -> COCO results -> pycocotools COCOeval -> named metrics.

Boxes are scored with ``iou_type="bbox"``, instance masks with ``"segm"`` (results carry RLE
``segmentation`` from :func:`to_coco_segm_results`; pycocotools derives their area and box).

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

from dfx.files import read_json, write_text_atomic

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


def to_coco_segm_results(image_ids, masks, scores, labels, category_ids) -> list[dict]:
    """Per-image instance masks as COCO segm results.

    ``masks``: B arrays/tensors [N_i, H_i, W_i] (0/1 or bool) on the pixels of the original image;
    the rest as :func:`to_coco_results`. Returns dicts ``{image_id, category_id, segmentation:
    compressed RLE (counts as a string, JSON-ready), score}``.
    """
    from pycocotools import mask as coco_mask

    results = []
    for image_id, image_masks, image_scores, image_labels in zip(image_ids, masks, scores, labels):
        image_masks = to_numpy(image_masks).astype(np.uint8)
        if not len(image_masks):
            continue
        rles = coco_mask.encode(np.asfortranarray(image_masks.transpose(1, 2, 0)))  # pycocotools wants [H, W, N]
        for rle, score, label in zip(rles, to_numpy(image_scores).tolist(), to_numpy(image_labels).tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                            "score": float(score)})
    return results


def to_numpy(values) -> np.ndarray:
    """A tensor (any device, any grad state), array or list as a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def run_cocoeval(coco_gt, results: list[dict], image_ids: list[int] | None = None, iou_type: str = "bbox"):
    """Run pycocotools' COCOeval quietly; returns ``(stats dict of STAT_NAMES, cocoeval)``.

    ``image_ids``: evaluate on these images only (default: every image of ``coco_gt``).
    ``iou_type``: ``bbox`` or ``segm`` (results with RLE or polygon ``segmentation``).
    Empty ``results`` evaluate as "nothing detected" (all zeros) rather than failing.
    """
    from pycocotools.cocoeval import COCOeval

    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results name image ids that are not in the ground truth: {sorted(unknown)[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        # loadRes adds fields (area, id, segmentation) to the dicts it is given: hand it copies
        detections = coco_gt.loadRes([dict(r) for r in results]) if results else empty_detections(coco_gt)
        cocoeval = COCOeval(coco_gt, detections, iouType=iou_type)
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
    """AP (IoU 0.50:0.95, all areas, 100 detections) per category name, for the categories that
    have ground truth in the evaluated images (:func:`without_ground_truth` names the others)."""
    precision = cocoeval.eval["precision"]  # [iou T, recall R, category K, area A, max dets M]
    out = {}
    for k, category_id in enumerate(cocoeval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]  # COCOeval leaves -1 where a category has no ground truth
        if values.size:
            out[cocoeval.cocoGt.cats[category_id]["name"]] = float(values.mean())
    return out


def without_ground_truth(cocoeval) -> list[str]:
    """Names of the categories with no (non-crowd) ground truth in the evaluated images."""
    precision = cocoeval.eval["precision"]
    return [cocoeval.cocoGt.cats[c]["name"] for k, c in enumerate(cocoeval.params.catIds)
            if not (precision[:, :, k, 0, -1] > -1).any()]


def evaluate_coco(coco_gt, results: list[dict], per_class: bool = True, image_ids: list[int] | None = None,
                  iou_type: str = "bbox") -> dict:
    """COCO box (``iou_type="segm"``: mask) metrics: the twelve :data:`STAT_NAMES` as floats in [0, 1] (undefined -> 0.0),
    plus, when asked, ``per_class`` {category name: AP} for the categories with ground truth and
    ``no_ground_truth`` [names of the others]. See :func:`run_cocoeval` for the arguments.
    """
    stats, cocoeval = run_cocoeval(coco_gt, results, image_ids, iou_type)
    if per_class:
        stats["per_class"] = class_ap(cocoeval)
        stats["no_ground_truth"] = without_ground_truth(cocoeval)
    return stats


def write_results(path: str | Path, results: list[dict]) -> None:
    """Write COCO results as JSON atomically: a reader sees the old file or the new one, never half."""
    write_text_atomic(path, json.dumps(results))


def read_results(path: str | Path, coco_gt) -> list[dict]:
    """A COCO results file (a JSON list of ``{image_id, category_id, bbox: [x, y, w, h], score}``),
    checked against the ground truth: every image and category id must be in it."""
    from dfx.data.coco import first
    from dfx.errors import UsageError

    results = read_json(path, "--predictions:")
    if not isinstance(results, list):
        raise UsageError(f"--predictions: {path} must hold a JSON list of detections (COCO results format: "
                         "image_id, category_id, bbox [x, y, w, h], score)")
    keys = {"image_id", "category_id", "bbox", "score"}
    broken = [i for i, r in enumerate(results) if not (isinstance(r, dict) and keys <= set(r) and
                                                       isinstance(r["bbox"], list) and len(r["bbox"]) == 4)]
    if broken:
        raise UsageError(f"--predictions: {path}: {len(broken)} entries are not detections (first: [{broken[0]}] = "
                         f"{str(results[broken[0]])[:80]}); each needs image_id, category_id, bbox [x, y, w, h], score")
    for field, known, what in (("image_id", set(coco_gt.imgs), "images"), ("category_id", set(coco_gt.cats),
                                                                          "categories")):
        unknown = sorted({r[field] for r in results} - known, key=str)
        if unknown:
            count = sum(r[field] in set(unknown) for r in results)
            raise UsageError(f"--predictions: {count} detections in {path} name {field}s that are not among the "
                             f"ground truth's {what}: {first(unknown)}; are they for these --annotations?")
    return [{k: r[k] for k in keys} for r in results]


def evaluate_results_file(predictions: str | Path, annotations: str | Path) -> dict:
    """COCO box metrics of any detector's results file against a COCO annotation file:
    ``{"metrics": {STAT_NAMES..., "AP/<class>"...}, "no_ground_truth": [...], "detections": N, "images": N,
    "predictions": PATH, "annotations": PATH}``."""
    from dfx.data.coco import read_ground_truth

    coco_gt = read_ground_truth(annotations)
    results = read_results(predictions, coco_gt)
    stats = evaluate_coco(coco_gt, results)
    per_class, missing = stats.pop("per_class"), stats.pop("no_ground_truth")
    return {"metrics": {**stats, **{f"AP/{name}": value for name, value in per_class.items()}},
            "no_ground_truth": missing, "detections": len(results), "images": len(coco_gt.imgs),
            "predictions": str(predictions), "annotations": str(annotations)}
