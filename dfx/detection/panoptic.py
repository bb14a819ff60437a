"""MaskDINO's panoptic and semantic inference: one image's query classes and masks -> a segment map.

The detector's class logits are sigmoid (focal) scores, not a softmax over classes plus "no
object"; MaskDINO sharpens them for these two outputs with a softmax over the sigmoid scores at
temperature ``temperature`` (its ``pano_temp`` 0.06, with ``transform_eval`` on).

Panoptic (MaskDINO ``panoptic_inference``): queries whose best sigmoid score exceeds
``object_mask_threshold`` (0.25) are kept; each pixel goes to the kept query with the largest
score x mask probability, and stays there only where that query's own probability is >= 0.5. A
query keeps its segment only when those pixels are at least ``overlap_threshold`` (0.8) of its
own mask (probability >= 0.5); the segments of one stuff class merge into one (the first one's
id); things stay one segment per query. Ids count from 1 in query order; 0 is void.

Semantic (MaskDINO ``semantic_inference``): class scores [K, H, W] = sum over queries of the
sharpened class scores times the mask probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor

# MaskDINO's test settings (detrex configs/maskdino_r50: object_mask_threshold, overlap_threshold,
# pano_temp, transform_eval)
OBJECT_MASK_THRESHOLD = 0.25
OVERLAP_THRESHOLD = 0.8
TEMPERATURE = 0.06


def sharpened_scores(class_logits: Tensor, temperature: float | None = TEMPERATURE) -> Tensor:
    """[Q, K] sigmoid scores, softmaxed over classes at ``temperature`` (None: the sigmoid scores)."""
    scores = class_logits.sigmoid()
    return scores if temperature is None else (scores / temperature).softmax(-1)


def panoptic_inference(class_logits: Tensor, mask_logits: Tensor, thing_classes: set[int] | list[int],
                       object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
                       overlap_threshold: float = OVERLAP_THRESHOLD,
                       temperature: float | None = TEMPERATURE) -> tuple[Tensor, list[dict]]:
    """One image: class logits [Q, K] and mask logits [Q, H, W] -> (segment ids int32 [H, W], 0 void;
    segments ``[{"id", "category_id" (the class index), "isthing"}]``)."""
    keep = class_logits.sigmoid().max(-1).values > object_mask_threshold
    scores, labels = sharpened_scores(class_logits[keep], temperature).max(-1)
    masks = mask_logits[keep].sigmoid()
    segment_map = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32, device=mask_logits.device)
    segments: list[dict] = []
    if not len(masks):
        return segment_map, segments
    owner = (scores[:, None, None] * masks).argmax(0)
    things = {int(c) for c in thing_classes}
    stuff_ids: dict[int, int] = {}
    for k, label in enumerate(labels.tolist()):
        own = masks[k] >= 0.5
        won = owner == k
        pixels = won & own
        own_area, won_area = int(own.sum()), int(won.sum())
        if not (own_area and won_area and pixels.any()) or won_area / own_area < overlap_threshold:
            continue
        if label not in things and label in stuff_ids:  # one segment per stuff class
            segment_map[pixels] = stuff_ids[label]
            continue
        segment_id = len(segments) + 1
        if label not in things:
            stuff_ids[label] = segment_id
        segment_map[pixels] = segment_id
        segments.append({"id": segment_id, "category_id": label, "isthing": label in things})
    return segment_map, segments


def semantic_inference(class_logits: Tensor, mask_logits: Tensor, temperature: float | None = TEMPERATURE) -> Tensor:
    """One image: class logits [Q, K], mask logits [Q, H, W] -> per-class scores [K, H, W]."""
    return torch.einsum("qk,qhw->khw", sharpened_scores(class_logits, temperature), mask_logits.sigmoid())
