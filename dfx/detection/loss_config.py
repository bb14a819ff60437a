"""The detector's matching and loss settings, declared once.

:class:`SetLossConfig` holds the Hungarian matcher's costs, the loss weights and the focal
parameters (Deformable-DETR's values: class 2, L1 5, GIoU 2 for both, focal α 0.25, γ 2);
:class:`HybridLossConfig` holds H-DETR's one-to-many settings; :class:`MaskLossConfig` MaskDINO's mask
terms (BCE and dice on sampled points, :mod:`dfx.detection.mask_loss`), and :data:`MASKDINO_SET_LOSS`
MaskDINO's class and box values (class 4, box 5, GIoU 2 for both the costs and the weights).
:class:`~dfx.detection.HungarianMatcher` and :class:`~dfx.detection.SetCriterion` take their defaults from these classes and check their
arguments with their ``validate``; the recipe's ``loss`` and ``model`` sections inherit them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

# Valid closed range of every SetLossConfig field; unlisted fields: [0, inf).
_BOUNDS = {"focal_alpha": (0.0, 1.0)}


@dataclass
class SetLossConfig:
    """Hungarian matcher costs and set-loss weights (each >= 0), and the focal parameters."""

    cost_class: float = 2.0  # focal classification cost
    cost_bbox: float = 5.0  # L1 distance of cxcywh boxes
    cost_giou: float = 2.0  # negative generalised IoU
    class_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25  # in [0, 1]
    focal_gamma: float = 2.0

    def validate(self) -> None:
        """Raise ValueError starting with the offending field's name."""
        for item in fields(SetLossConfig):
            value = getattr(self, item.name)
            low, high = _BOUNDS.get(item.name, (0.0, math.inf))
            if not low <= value <= high:  # NaN fails too
                expected = f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
                raise ValueError(f"{item.name} must be {expected}, got {value}")
        if self.cost_class == self.cost_bbox == self.cost_giou == 0.0:
            raise ValueError("cost_class, cost_bbox and cost_giou cannot all be 0: nothing would rank the matches")


@dataclass
class HybridLossConfig:
    """H-DETR's one-to-many branch: each target matched to ``one2many_k`` queries, loss times
    ``one2many_weight`` (λ)."""

    one2many_k: int = 6
    one2many_weight: float = 1.0

    def validate(self) -> None:
        """Raise ValueError starting with the offending field's name."""
        if isinstance(self.one2many_k, bool) or not isinstance(self.one2many_k, int) or self.one2many_k < 1:
            raise ValueError(f"one2many_k must be an integer >= 1, got {self.one2many_k!r}")
        if not self.one2many_weight >= 0:
            raise ValueError(f"one2many_weight must be >= 0, got {self.one2many_weight}")


@dataclass
class MaskLossConfig:
    """MaskDINO's mask terms (detrex ``maskdino_r50``): matching costs and loss weights of the
    point-sampled BCE and dice, the points per mask, and the uncertainty sampling of the loss points."""

    cost_mask: float = 5.0
    cost_dice: float = 5.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    mask_points: int = 12544  # 112 x 112
    oversample_ratio: float = 3.0  # candidates per loss point
    importance_sample_ratio: float = 0.75  # share of the loss points chosen by uncertainty

    def validate(self) -> None:
        """Raise ValueError starting with the offending field's name."""
        for name in ("cost_mask", "cost_dice", "mask_weight", "dice_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.mask_points, bool) or not isinstance(self.mask_points, int) or self.mask_points < 1:
            raise ValueError(f"mask_points must be an integer >= 1, got {self.mask_points!r}")
        if not self.oversample_ratio >= 1:
            raise ValueError(f"oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if not 0 <= self.importance_sample_ratio <= 1:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")


# MaskDINO's class and box values (detrex maskdino_r50: class 4, box L1 5, GIoU 2, costs as weights)
MASKDINO_SET_LOSS = SetLossConfig(cost_class=4.0, cost_bbox=5.0, cost_giou=2.0, class_weight=4.0, bbox_weight=5.0,
                                  giou_weight=2.0)
