"""Keypoints: the per-keypoint OKS sigmas, left/right flip pairs and the object keypoint similarity.

OKS (COCO's keypoint similarity) of a predicted pose ``d`` against a ground-truth pose ``g`` with
area ``s`` and per-keypoint sigmas ``σ``:

    OKS = Σ_i [v_i > 0] exp(-d_i² / (2 s (2σ_i)²)) / Σ_i [v_i > 0]

where ``d_i`` is the distance of keypoint ``i`` and ``v_i`` its ground-truth visibility (0: not
labelled, 1: labelled but occluded, 2: visible). This is what pycocotools' ``computeOks`` computes
for a ground truth with at least one labelled keypoint.

Sigmas: COCO's 17 person keypoints have pycocotools' constants (:data:`COCO_SIGMAS`). Another
skeleton's sigmas come from the recipe (``data.sigmas``), or the annotation file's category
(``"sigmas": [...]``, one per keypoint name); :func:`resolve_sigmas` picks them in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
# pycocotools' kpt_oks_sigmas for the 17 COCO person keypoints, in COCO_KEYPOINTS order
COCO_SIGMAS = tuple(v / 10.0 for v in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87,
                                       .89, .89))

# COCO's person skeleton, 0-based pairs of COCO_KEYPOINTS
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
                 (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))


def known_skeleton(root: str, count: int) -> tuple[tuple[int, int], ...]:
    """The 0-based skeleton pairs to draw for data ``root`` with ``count`` keypoints: shapes-pose's,
    COCO's for 17, else none (keypoints drawn as dots)."""
    if str(root) == "shapes-pose":
        from dfx.data.shapes_pose import SKELETON

        return tuple((a - 1, b - 1) for a, b in SKELETON)
    return COCO_SKELETON if count == len(COCO_KEYPOINTS) else ()


def resolve_sigmas(count: int, given: Sequence[float] | None = None, category: dict | None = None,
                   where: str = "keypoints") -> tuple[float, ...]:
    """The ``count`` per-keypoint OKS sigmas: ``given`` (the recipe's / the command line's), else the
    annotation category's ``sigmas``, else COCO's 17 when ``count`` is 17. A ValueError names the
    mismatch and the fix otherwise."""
    for source, values in (("the given sigmas", given), ("the category's sigmas", (category or {}).get("sigmas"))):
        if values is None:
            continue
        values = tuple(float(v) for v in values)
        if len(values) != count:
            raise ValueError(f"{where}: {source} hold {len(values)} values for {count} keypoints; give one "
                             "sigma per keypoint")
        if not all(np.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"{where}: {source} must be positive numbers, got {list(values)}")
        return values
    if count == len(COCO_SIGMAS):
        return COCO_SIGMAS
    raise ValueError(f"{where}: {count} keypoints per instance, and no sigmas for them: OKS needs one sigma per "
                     "keypoint (COCO's are for its 17 person keypoints); set data.sigmas in the recipe, "
                     "--sigmas on the command line, or \"sigmas\": [...] in the annotations' category")


def flip_permutation(names: Sequence[str], flip_pairs: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The index map that a horizontal flip applies to keypoints: keypoint ``i`` of the flipped image
    is keypoint ``perm[i]`` of the original. ``flip_pairs`` (index pairs) when given, else the pairs
    of names that differ only by ``left``/``right`` (``left_eye`` <-> ``right_eye``)."""
    perm = list(range(len(names)))
    if flip_pairs is None:
        index = {name: i for i, name in enumerate(names)}
        flip_pairs = []
        for i, name in enumerate(names):
            if "left" in name:
                other = index.get(name.replace("left", "right"))
                if other is not None:
                    flip_pairs.append((i, other))
    for a, b in flip_pairs:
        a, b = int(a), int(b)
        if not (0 <= a < len(names) and 0 <= b < len(names)):
            raise ValueError(f"flip_pairs: ({a}, {b}) is outside the {len(names)} keypoints")
        perm[a], perm[b] = b, a
    return perm


def oks(predicted, truth, visibility, area, sigmas):
    """Object keypoint similarity between every prediction and every ground truth (torch or numpy).

    ``predicted`` [N, K, 2], ``truth`` [M, K, 2], ``visibility`` [M, K] (> 0: labelled), ``area`` [M],
    ``sigmas`` [K]. Returns [N, M]. A ground truth without labelled keypoints scores 0 (pycocotools
    instead measures the distance to its box; such instances carry no keypoint loss in training).
    """
    import torch

    as_numpy = isinstance(predicted, np.ndarray)
    predicted, truth, visibility, area, sigmas = (torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v,
                                                                  dtype=torch.float64 if as_numpy else None)
                                                  for v in (predicted, truth, visibility, area, sigmas))
    dtype = predicted.dtype
    truth, visibility, area, sigmas = (v.to(dtype) for v in (truth, visibility, area, sigmas))
    squared = ((predicted[:, None] - truth[None]) ** 2).sum(-1)  # [N, M, K]
    variances = (2 * sigmas) ** 2
    e = squared / variances / (area[None, :, None] + np.spacing(1)) / 2
    labelled = (visibility > 0).to(dtype)[None]  # [1, M, K]
    value = (torch.exp(-e) * labelled).sum(-1) / labelled.sum(-1).clamp(min=1)
    return value.numpy() if as_numpy else value


def keypoint_summary(annotations: list[dict], categories: list[dict]) -> dict | None:
    """What ``dfx data check`` reports of a split's keypoints, or None when no category has any:
    ``{"keypoints": names, "instances": N, "per_instance": mean labelled (v > 0) per non-crowd instance,
    "visibility": {"0": n, "1": n, "2": n} over every keypoint slot, "without_keypoints": instances
    with none labelled, "wrong_length": annotations whose list is not 3 x K}``."""
    named = [c for c in categories if c.get("keypoints")]
    if not named:
        return None
    k = len(named[0]["keypoints"])
    ids = {c["id"] for c in named}
    visibility = {"0": 0, "1": 0, "2": 0}
    labelled, instances, without, wrong = 0, 0, 0, []
    for ann in annotations:
        if ann.get("iscrowd", 0) or ann.get("category_id") not in ids:
            continue
        values = ann.get("keypoints") or [0] * (3 * k)
        if len(values) != 3 * k:
            wrong.append(ann.get("id"))
            continue
        instances += 1
        count = 0
        for v in values[2::3]:
            key = str(int(v)) if v in (0, 1, 2) else "0"
            visibility[key] += 1
            count += v > 0
        labelled += count
        without += count == 0
    return {"keypoints": list(named[0]["keypoints"]), "instances": instances,
            "per_instance": round(labelled / instances, 3) if instances else 0.0, "visibility": visibility,
            "without_keypoints": without, "wrong_length": wrong}
