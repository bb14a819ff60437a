"""Panoptic quality (PQ, SQ, RQ) with the COCO panoptic definitions (cocodataset/panopticapi).

Per image, from a ground-truth and a predicted segment-id map (0 = void / unlabelled) and each
side's segments (``id``, ``category_id``; ground truth also ``iscrowd`` and ``area``):

* a ground-truth and a predicted segment of the same category match when their IoU > 0.5, the
  union leaving out the predicted pixels that fall on void; crowd regions never match;
* unmatched non-crowd ground-truth segments are false negatives;
* an unmatched predicted segment is a false positive unless more than half of it lies on void or
  on a crowd region of its own category (those are ignored).

The ground-truth area is the segment's ``area`` as given (panopticapi reads it from the JSON); a
prediction's area is its pixel count. Per category with any TP, FP or FN: PQ = sum IoU(TP) /
(TP + FP/2 + FN/2), SQ = sum IoU(TP) / TP (0 without TP), RQ = TP / (TP + FP/2 + FN/2). PQ, SQ and
RQ are their means over those categories: all, things (``isthing`` 1) and stuff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfx.errors import UsageError

VOID = 0
OFFSET = 256 * 256 * 256  # above any id of an RGB-encoded panoptic PNG


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """A COCO panoptic PNG's pixels uint8 [H, W, 3] -> segment ids int64 [H, W] (R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> uint8 [H, W, 3], the inverse of :func:`rgb_to_id`."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256) % 256], -1).astype(np.uint8)


@dataclass
class CategoryStat:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0


@dataclass
class PanopticQuality:
    """Accumulates per-category TP / FP / FN and matched IoU over images (:meth:`add`), then
    summarises them (:meth:`summary`). ``categories``: ``[{"id", "isthing", ...}]``."""

    categories: list[dict]
    stats: dict[int, CategoryStat] = field(default_factory=dict)

    def __post_init__(self):
        self.stats = {int(c["id"]): CategoryStat() for c in self.categories}

    def add(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray, pred_segments: list[dict],
            image: str = "") -> None:
        """One image's ground truth and prediction (id maps of one shape; see the module docstring)."""
        if gt_ids.shape != pred_ids.shape:
            raise UsageError(f"panoptic {image}: prediction is {pred_ids.shape[::-1]} pixels, ground truth "
                             f"{gt_ids.shape[::-1]}; predict at the annotation's size")
        gt = {int(s["id"]): s for s in gt_segments}
        pred = {int(s["id"]): dict(s) for s in pred_segments}
        for segment in pred.values():
            if int(segment["category_id"]) not in self.stats:
                raise UsageError(f"panoptic {image}: predicted segment {segment['id']} has category "
                                 f"{segment['category_id']}, not a category of the annotations")
            segment["area"] = 0
        ids, counts = np.unique(pred_ids, return_counts=True)
        for segment_id, count in zip(ids.tolist(), counts.tolist()):
            if segment_id == VOID:
                continue
            if segment_id not in pred:
                raise UsageError(f"panoptic {image}: the predicted map has segment {segment_id}, which its "
                                 "segments_info does not list; list every segment id of the PNG")
            pred[segment_id]["area"] = count
        empty = [i for i, s in pred.items() if s["area"] == 0]
        if empty:
            raise UsageError(f"panoptic {image}: segments_info lists segment {empty[0]}, which has no pixel in "
                             "the predicted map; list only the segments drawn")
        pairs, counts = np.unique(gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64), return_counts=True)
        overlap = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs, counts)}
        gt_matched, pred_matched = set(), set()
        for (g, p), intersection in overlap.items():
            if g not in gt or p not in pred or gt[g].get("iscrowd", 0) == 1:
                continue
            if int(gt[g]["category_id"]) != int(pred[p]["category_id"]):
                continue
            union = pred[p]["area"] + gt[g]["area"] - intersection - overlap.get((VOID, p), 0)
            iou = intersection / union
            if iou > 0.5:
                stat = self.stats[int(gt[g]["category_id"])]
                stat.tp += 1
                stat.iou += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd_of: dict[int, int] = {}  # category -> its crowd segment
        for g, segment in gt.items():
            if g in gt_matched:
                continue
            if segment.get("iscrowd", 0) == 1:
                crowd_of[int(segment["category_id"])] = g
                continue
            self.stats[int(segment["category_id"])].fn += 1
        for p, segment in pred.items():
            if p in pred_matched:
                continue
            ignored = overlap.get((VOID, p), 0)
            if int(segment["category_id"]) in crowd_of:
                ignored += overlap.get((crowd_of[int(segment["category_id"])], p), 0)
            if ignored / segment["area"] > 0.5:
                continue
            self.stats[int(segment["category_id"])].fp += 1

    def summary(self) -> dict:
        """``{"PQ", "SQ", "RQ", "PQ_th", ..., "PQ_st", ..., "n", "n_th", "n_st", "per_class": {id: {"PQ", "SQ",
        "RQ"}}}``: fractions in [0, 1]; a group without any counted category scores 0 with n 0."""
        per_class = {}
        for category_id, s in self.stats.items():
            if s.tp + s.fp + s.fn == 0:
                continue
            denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
            per_class[category_id] = {"PQ": s.iou / denominator, "SQ": s.iou / s.tp if s.tp else 0.0,
                                      "RQ": s.tp / denominator}
        out: dict = {}
        thing = {int(c["id"]): bool(c.get("isthing", 1)) for c in self.categories}
        for suffix, wanted in (("", None), ("_th", True), ("_st", False)):
            chosen = [v for k, v in per_class.items() if wanted is None or thing[k] == wanted]
            for name in ("PQ", "SQ", "RQ"):
                out[name + suffix] = sum(v[name] for v in chosen) / len(chosen) if chosen else 0.0
            out["n" + suffix] = len(chosen)
        out["per_class"] = per_class
        return out


def is_panoptic_file(path) -> bool:
    """True when the JSON file at ``path`` is in the COCO panoptic format (``annotations`` with ``segments_info``)."""
    from dfx.files import read_json

    document = read_json(path, "--predictions:")
    annotations = document.get("annotations") if isinstance(document, dict) else None
    return isinstance(annotations, list) and bool(annotations) and all(
        isinstance(a, dict) and "segments_info" in a for a in annotations)


def evaluate_panoptic_files(predictions, annotations, pred_folder=None, gt_folder=None) -> dict:
    """PQ of a COCO panoptic prediction (JSON + PNG folder) against COCO panoptic ground truth.

    Each JSON's PNGs are in the folder of the same name beside it (``panoptic_val2017.json`` ->
    ``panoptic_val2017/``, the COCO layout) unless given; images are matched by ``image_id`` and
    every ground-truth image needs a prediction. Returns ``{"iou_type": "panoptic", "metrics":
    {"PQ", "SQ", "RQ", "PQ_th", ..., "PQ/<class>"...}, "detections": segments predicted, "images",
    "predictions", "annotations"}``.
    """
    from PIL import Image

    from dfx.files import read_json

    predictions, annotations = Path(predictions), Path(annotations)
    gt, pred = read_json(annotations, "--annotations:"), read_json(predictions, "--predictions:")
    if not (isinstance(gt, dict) and isinstance(gt.get("categories"), list) and isinstance(gt.get("annotations"), list)
            and all("segments_info" in a for a in gt["annotations"])):
        raise UsageError(f"--annotations: {annotations} is not a COCO panoptic annotation file (categories, and "
                         "annotations with segments_info); score panoptic predictions against panoptic ground truth")
    gt_folder = Path(gt_folder) if gt_folder else annotations.with_suffix("")
    pred_folder = Path(pred_folder) if pred_folder else predictions.with_suffix("")
    for folder, flag in ((gt_folder, "--annotations"), (pred_folder, "--predictions")):
        if not folder.is_dir():
            raise UsageError(f"{flag}: the PNG folder {folder} is missing; COCO panoptic keeps each JSON's PNGs in "
                             "the folder of the same name beside it")
    by_image = {a["image_id"]: a for a in pred["annotations"]}
    missing = [a["image_id"] for a in gt["annotations"] if a["image_id"] not in by_image]
    if missing:
        raise UsageError(f"--predictions: no prediction for {len(missing)} of {len(gt['annotations'])} images "
                         f"(first: image_id {missing[0]}); predict every image of the annotations")
    quality = PanopticQuality(gt["categories"])
    segments = 0
    for truth in gt["annotations"]:
        guess = by_image[truth["image_id"]]
        gt_ids = rgb_to_id(np.asarray(Image.open(gt_folder / truth["file_name"]).convert("RGB")))
        pred_ids = rgb_to_id(np.asarray(Image.open(pred_folder / guess["file_name"]).convert("RGB")))
        quality.add(gt_ids, truth["segments_info"], pred_ids, guess["segments_info"], image=guess["file_name"])
        segments += len(guess["segments_info"])
    summary = quality.summary()
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in gt["categories"]}
    metrics = {k: v for k, v in summary.items() if k != "per_class"}
    metrics.update({f"PQ/{names[c]}": v["PQ"] for c, v in summary["per_class"].items()})
    return {"iou_type": "panoptic", "metrics": metrics, "detections": segments, "images": len(gt["annotations"]),
            "predictions": str(predictions), "annotations": str(annotations)}
