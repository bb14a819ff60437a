"""COCO box, mask and keypoint evaluation: detections -> COCO results -> pycocotools COCOeval -> named metrics.

Boxes are scored with ``iou_type="bbox"``, instance masks with ``"segm"`` (results carry RLE
``segmentation`` from :func:`to_coco_segm_results`; pycocotools derives their area and box),
poses with ``"keypoints"`` (OKS with the per-keypoint sigmas of :mod:`dfx.data.keypoints`).

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
import logging
import math
from pathlib import Path

import numpy as np

from dfx.data.coco import is_number
from dfx.files import read_json, write_text_atomic

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# COCOeval's ten keypoint numbers (OKS instead of IoU; no small objects, 20 detections per image)
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


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


def run_cocoeval(coco_gt, results: list[dict], image_ids: list[int] | None = None, iou_type: str = "bbox",
                 sigmas=None):
    """Run pycocotools' COCOeval quietly; returns ``(stats dict of STAT_NAMES, cocoeval)``.

    ``image_ids``: evaluate on these images only (default: every image of ``coco_gt``).
    ``iou_type``: ``bbox``, ``segm`` (results with RLE or polygon ``segmentation``) or ``keypoints``
    (stats named by :data:`KEYPOINT_STAT_NAMES`; ``sigmas``: the per-keypoint OKS sigmas, default
    pycocotools' 17 COCO ones).
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
        if iou_type == "keypoints" and sigmas is not None:
            cocoeval.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        if image_ids is not None:
            cocoeval.params.imgIds = list(image_ids)
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
    stats = {name: max(float(value), 0.0) for name, value in zip(names, cocoeval.stats)}
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
                  iou_type: str = "bbox", sigmas=None) -> dict:
    """COCO metrics of ``iou_type`` (``bbox``, ``segm``: masks): the twelve :data:`STAT_NAMES` as floats
    in [0, 1] (undefined -> 0.0), plus, when asked, ``per_class`` {category name: AP} for the categories with ground truth and
    ``no_ground_truth`` [names of the others]. See :func:`run_cocoeval` for the arguments.
    """
    stats, cocoeval = run_cocoeval(coco_gt, results, image_ids, iou_type, sigmas)
    if per_class:
        stats["per_class"] = class_ap(cocoeval)
        stats["no_ground_truth"] = without_ground_truth(cocoeval)
    return stats


def write_results(path: str | Path, results: list[dict]) -> None:
    """Write COCO results as JSON atomically: a reader sees the old file or the new one, never half."""
    write_text_atomic(path, json.dumps(results))


IOU_TYPES = {"keypoints": "keypoints", "segmentation": "segm", "bbox": "bbox"}  # the entries' key -> COCOeval's type
KEY_OF = {kind: key for key, kind in IOU_TYPES.items()}  # COCOeval's type -> the entries' key
FIELDS = {"bbox": "bbox [x, y, w, h]", "segm": "segmentation (RLE or polygons)", "keypoints": "keypoints [x, y, v] * K"}


def iou_type_of(entry: dict) -> str:
    """What a results entry is scored as: ``keypoints``, ``segm`` (it has a mask) or ``bbox``."""
    return next((kind for key, kind in IOU_TYPES.items() if key in entry), "bbox")


def entry_problem(entry, iou_type: str) -> str | None:
    """Why a results entry of ``iou_type`` cannot be scored ("score is not a finite number", ...), or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    field = KEY_OF[iou_type]
    missing = [k for k in ("image_id", "category_id", field, "score") if k not in entry]
    if missing:
        return f"no {', '.join(missing)}"
    for key in ("image_id", "category_id"):
        if not is_integer(entry[key]):
            return f"{key} is not an integer ({entry[key]!r})"
    if not is_number(entry["score"]):
        return f"score is not a number ({entry['score']!r})"
    if not math.isfinite(entry["score"]):
        return f"score is {entry['score']}"
    values = entry.get("bbox") if iou_type == "bbox" else entry.get("keypoints") if iou_type == "keypoints" else None
    if values is not None:
        if not (isinstance(values, list) and all(is_number(v) for v in values)):
            return f"{field} is not a list of numbers ({str(values)[:40]})"
        if not all(math.isfinite(v) for v in values):
            return f"{field} holds NaN or infinity"
        if iou_type == "bbox" and len(values) != 4:
            return f"bbox has {len(values)} numbers, not 4 (x, y, w, h)"
        if iou_type == "bbox" and (values[2] < 0 or values[3] < 0):
            return "bbox has a negative width or height"
        if iou_type == "keypoints" and (not values or len(values) % 3):
            return f"keypoints has {len(values)} numbers, not 3 (x, y, visibility) per keypoint"
    if iou_type == "segm" and not _is_mask(entry["segmentation"]):
        return "segmentation is neither RLE ({size, counts}) nor polygons ([[x, y, ...], ...])"
    return None


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_mask(value) -> bool:
    if isinstance(value, dict):
        return {"size", "counts"} <= set(value)
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, list) and len(p) >= 6 and all(is_number(v) and math.isfinite(v) for v in p) for p in value)


def read_results(path: str | Path, coco_gt, strict: bool = False, sigmas=None) -> tuple[list[dict], str]:
    """A COCO results file checked against the ground truth ``coco_gt``: ``(entries, iou_type)``.

    The IoU type comes from the entries' keys (:func:`iou_type_of`): ``keypoints``, ``segmentation``
    (segm) or ``bbox``; a mix, a type the annotations cannot score, an entry that is not a finite
    detection (:func:`entry_problem`) or ids not in the ground truth are a :class:`UsageError` naming
    how many entries and the first. An empty list is a warning (a UsageError when ``strict``).
    """
    from dfx.data.coco import first
    from dfx.errors import UsageError

    results = read_json(path, "--predictions:")
    if isinstance(results, dict) and "images" in results:
        raise UsageError(f"--predictions: {path} is a COCO annotation file, not a results list; did you swap "
                         "--predictions and --annotations?")
    if not isinstance(results, list):
        raise UsageError(f"--predictions: {path} must hold a JSON list of detections (COCO results format: "
                         "image_id, category_id, bbox [x, y, w, h] or segmentation or keypoints, score)")
    if not results:
        message = f"--predictions: {path} is an empty list: nothing detected, every metric is 0"
        if strict:
            raise UsageError(f"{message} (--strict); check that the detector wrote its results")
        logger.warning(f"dfx eval: {message}")
        return [], "bbox"
    kinds: dict[str, list[int]] = {}
    for i, entry in enumerate(results):
        kinds.setdefault(iou_type_of(entry) if isinstance(entry, dict) else "bbox", []).append(i)
    if len(kinds) > 1:
        parts = ", ".join(f"{len(where)} {kind} (first: [{where[0]}])" for kind, where in kinds.items())
        raise UsageError(f"--predictions: {path} mixes entry types: {parts}; a results file holds one type "
                         "(bbox, segmentation or keypoints)")
    iou_type = next(iter(kinds))
    problems = [(i, why) for i, entry in enumerate(results) if (why := entry_problem(entry, iou_type))]
    if problems:
        i, why = problems[0]
        raise UsageError(f"--predictions: {len(problems)} of {len(results)} entries in {path} cannot be scored "
                         f"(first: [{i}] {why}: {str(results[i])[:80]}); each needs image_id and category_id "
                         f"(integers), {FIELDS[iou_type]} and score (finite numbers)")
    for field, known, what in (("image_id", set(coco_gt.imgs), "images"), ("category_id", set(coco_gt.cats),
                                                                          "categories")):
        unknown = [i for i, r in enumerate(results) if r[field] not in known]
        if unknown:
            names = sorted({results[i][field] for i in unknown})
            raise UsageError(f"--predictions: {len(unknown)} of {len(results)} entries in {path} name {field}s that "
                             f"are not among the ground truth's {what} ({first(names)}; first: [{unknown[0]}]); "
                             "are they for these --annotations?")
    check_scorable(coco_gt, results, iou_type, path, sigmas)
    field = KEY_OF[iou_type]
    return [{k: r[k] for k in ("image_id", "category_id", field, "score")} for r in results], iou_type


def check_scorable(coco_gt, results: list[dict], iou_type: str, path, sigmas=None):
    """A UsageError unless the ground truth holds what ``iou_type`` compares: masks for segm, keypoints
    of the results' count for keypoints. Keypoints: returns the OKS sigmas (``sigmas`` given, else the
    category's ``sigmas``, else COCO's for 17 keypoints; :func:`dfx.data.keypoints.resolve_sigmas`)."""
    from dfx.data.keypoints import resolve_sigmas
    from dfx.errors import UsageError

    annotations = coco_gt.dataset.get("annotations", [])
    if iou_type == "segm":
        lacking = [a.get("id") for a in annotations if not a.get("segmentation")]
        if lacking or not annotations:
            raise UsageError(f"--predictions: {path} holds segmentation results but {len(lacking)} of "
                             f"{len(annotations)} annotations have no segmentation; score them against "
                             "annotations with masks, or drop 'segmentation' from the entries to score the boxes")
    if iou_type != "keypoints":
        return None
    sizes = {len(r["keypoints"]) // 3 for r in results}
    scored = {r["category_id"] for r in results}
    lacking = [c for c in scored if not coco_gt.cats[c].get("keypoints")]
    with_points = [a for a in annotations if a.get("category_id") in scored and a.get("keypoints")]
    if lacking or not with_points:
        raise UsageError(f"--predictions: {path} holds keypoint results but the annotations have no keypoints "
                         f"for {'categories ' + str(sorted(lacking)) if lacking else 'their categories'}; score "
                         "them against person-keypoint annotations, or drop 'keypoints' to score boxes")
    truth = {len(a["keypoints"]) // 3 for a in with_points} | {len(coco_gt.cats[c]["keypoints"]) for c in scored}
    if len(sizes | truth) != 1:
        raise UsageError(f"--predictions: keypoints: {sorted(sizes)} per result and {sorted(truth)} per annotation "
                         "(and category); the results must have the annotations' keypoints, in their order")
    if len(scored) > 1:
        raise UsageError(f"--predictions: keypoint results for {len(scored)} categories {sorted(scored)}; OKS "
                         "uses one set of sigmas: score one keypoint category per file")
    category = coco_gt.cats[next(iter(scored))]
    try:
        return resolve_sigmas(next(iter(sizes)), sigmas, category, where="--predictions")
    except ValueError as error:
        raise UsageError(str(error)) from None


def evaluate_results_file(predictions: str | Path, annotations: str | Path, strict: bool = False,
                          sigmas=None) -> dict:
    """COCO metrics of any model's results file against a COCO annotation file, with the IoU type
    the entries call for: ``{"iou_type": "bbox"|"segm"|"keypoints", "metrics": {STAT_NAMES...,
    "AP/<class>"...}, "no_ground_truth": [...], "detections": N, "images": N, "predictions": PATH,
    "annotations": PATH}`` (keypoints: :data:`KEYPOINT_STAT_NAMES` and ``"sigmas"``, the OKS sigmas
    used: ``sigmas`` when given, else the category's, else COCO's 17). A COCO panoptic prediction (JSON
    with ``segments_info``, PNGs in the folder of its name) is scored by PQ instead
    (:func:`dfx.data.panoptic_eval.evaluate_panoptic_files`)."""
    from dfx.data.coco import read_ground_truth
    from dfx.data.panoptic_eval import evaluate_panoptic_files, is_panoptic_file

    if is_panoptic_file(predictions):  # COCO panoptic JSON + PNGs: PQ / SQ / RQ
        return evaluate_panoptic_files(predictions, annotations)
    coco_gt = read_ground_truth(annotations)
    results, iou_type = read_results(predictions, coco_gt, strict, sigmas)
    if iou_type == "segm":
        results = [{**r, "segmentation": to_rle(r["segmentation"], coco_gt.imgs[r["image_id"]])} for r in results]
    used = check_scorable(coco_gt, results, iou_type, predictions, sigmas) if results else None
    stats = evaluate_coco(coco_gt, results, iou_type=iou_type, sigmas=used)
    per_class, missing = stats.pop("per_class"), stats.pop("no_ground_truth")
    extra = {"sigmas": list(used)} if used is not None else {}
    metrics = {**stats, **{f"AP/{name}": value for name, value in per_class.items()}}
    return {"iou_type": iou_type, **extra, "metrics": metrics,
            "no_ground_truth": missing, "detections": len(results), "images": len(coco_gt.imgs),
            "predictions": str(predictions), "annotations": str(annotations)}


def to_rle(segmentation, image: dict) -> dict:
    """A results mask as compressed RLE (what pycocotools' loadRes takes): polygons and
    uncompressed RLE are encoded at the image's size."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict) and isinstance(segmentation["counts"], str):
        return segmentation
    height, width = image.get("height"), image.get("width")
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    return mask_utils.frPyObjects(segmentation, *segmentation["size"])
