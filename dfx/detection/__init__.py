"""Detection: Hungarian matching (one-to-one and H-DETR one-to-many)."""

from dfx.detection.matcher import HungarianMatcher, repeat_targets

__all__ = ["HungarianMatcher", "repeat_targets"]
