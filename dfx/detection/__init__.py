"""Detection: Deformable-DETR with H-DETR's hybrid matching, its matcher, losses and post-processing."""

from dfx.detection.criterion import SetCriterion
from dfx.detection.detector import DeformableDETR, DetectorConfig, postprocess
from dfx.detection.matcher import HungarianMatcher, repeat_targets

__all__ = ["DeformableDETR", "DetectorConfig", "HungarianMatcher", "SetCriterion", "postprocess", "repeat_targets"]
