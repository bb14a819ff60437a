"""Depth evaluation, shared by ``dfx train/eval`` (the depth task's evaluator), ``dfx predict`` and
``dfx compare``: the standard monocular-depth metrics (Eigen et al. 2014) on valid pixels.

A pixel counts when its ground truth is a return (``> 0``; zero is "no depth"), lies in
(``min_depth``, ``max_depth``) and inside the evaluation crop:

- ``eigen``: NYU Depth v2's crop (Eigen et al.), rows 45:471 and columns 41:601 of the 480x640
  frame, as fractions of the image so that it scales with it;
- ``garg``: KITTI's crop (Garg et al. 2016), rows 0.40810811-0.99189189 and columns
  0.03594771-0.96405229 of the image;
- ``none``: the whole image.

Predictions are clipped to [min_depth, max_depth] (as BTS / AdaBins evaluate). Metrics per image,
then averaged over images (images without a valid pixel are left out and counted):

- AbsRel = mean |d - g| / g,  SqRel = mean (d - g)^2 / g,  RMSE = sqrt(mean (d - g)^2),
- RMSE_log = sqrt(mean (ln d - ln g)^2),  d1/d2/d3 = share of pixels with max(d/g, g/d) < 1.25^k.

Relative (inverse-depth) predictions are first aligned to the ground truth per image: the scale
and shift that best fit them, by least squares, to 1/g on the valid pixels (MiDaS / DPT's
protocol), the result clamped below at 1/max_depth and inverted.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (top, bottom, left, right) as fractions of the image's height and width
CROPS = {
    "none": (0.0, 1.0, 0.0, 1.0),
    "eigen": (45 / 480, 471 / 480, 41 / 640, 601 / 640),
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
}
METRICS = ("AbsRel", "SqRel", "RMSE", "RMSE_log", "d1", "d2", "d3")
LOWER_IS_BETTER = ("AbsRel", "SqRel", "RMSE", "RMSE_log")


def crop_mask(height: int, width: int, crop: str, device=None) -> Tensor:
    """[H, W] bool, True inside the evaluation crop (see the module docstring)."""
    top, bottom, left, right = CROPS[crop]
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[int(top * height):int(bottom * height), int(left * width):int(right * width)] = True
    return mask


def valid_mask(target: Tensor, min_depth: float, max_depth: float, crop: str = "none") -> Tensor:
    """[..., H, W] bool: ground truth in (min_depth, max_depth), inside ``crop``."""
    mask = (target > min_depth) & (target < max_depth)
    return mask & crop_mask(*target.shape[-2:], crop, device=target.device)


def align_scale_shift(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``s * prediction + t`` with the per-image (s, t) minimising sum over ``mask`` of (s p + t - target)^2.

    prediction, target, mask [B, H, W]. An image whose system is singular (fewer than two distinct
    valid values) gets s = t = 0. Differentiable (the SSI loss trains through it).
    """
    m = mask.to(prediction.dtype)
    a00 = (m * prediction * prediction).sum((-2, -1))
    a01 = (m * prediction).sum((-2, -1))
    a11 = m.sum((-2, -1))
    b0 = (m * prediction * target).sum((-2, -1))
    b1 = (m * target).sum((-2, -1))
    det = a00 * a11 - a01 * a01
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (a11 * b0 - a01 * b1) / safe, torch.zeros_like(det))
    shift = torch.where(ok, (a00 * b1 - a01 * b0) / safe, torch.zeros_like(det))
    return scale[:, None, None] * prediction + shift[:, None, None]


def relative_to_depth(inverse: Tensor, target: Tensor, mask: Tensor, max_depth: float) -> Tensor:
    """Relative inverse depth [B, H, W] -> metres, aligned per image to 1/target on ``mask``."""
    disparity = torch.where(mask, 1.0 / target.clamp(min=1e-6), torch.zeros_like(target))
    aligned = align_scale_shift(inverse, disparity, mask)
    return 1.0 / aligned.clamp(min=1.0 / max_depth)


def image_metrics(prediction: Tensor, target: Tensor, mask: Tensor) -> dict[str, float] | None:
    """The metrics of one image: prediction, target [H, W] in metres, mask [H, W] bool; None if no pixel."""
    if not bool(mask.any()):
        return None
    d = prediction[mask].double()
    g = target[mask].double()
    ratio = torch.maximum(d / g, g / d)
    diff = d - g
    return {
        "AbsRel": float((diff.abs() / g).mean()),
        "SqRel": float((diff ** 2 / g).mean()),
        "RMSE": float((diff ** 2).mean().sqrt()),
        "RMSE_log": float(((d.log() - g.log()) ** 2).mean().sqrt()),
        "d1": float((ratio < 1.25).double().mean()),
        "d2": float((ratio < 1.25 ** 2).double().mean()),
        "d3": float((ratio < 1.25 ** 3).double().mean()),
    }


class DepthMetrics:
    """Per-image metrics summed over images; ``summary()`` averages them.

    ``add(prediction, target)``: [B, H, W] metres (or, with ``relative``, inverse depth up to
    scale and shift), both at the ground truth's resolution; zero targets are no returns.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, crop: str = "none",
                 relative: bool = False):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        self.min_depth, self.max_depth, self.crop, self.relative = min_depth, max_depth, crop, relative
        self.sums = dict.fromkeys(METRICS, 0.0)
        self.images = 0
        self.empty = 0

    def add(self, prediction: Tensor, target: Tensor) -> list[dict | None]:
        """Count a batch; returns each image's metrics (None where it has no valid pixel)."""
        prediction, target = prediction.float(), target.float()
        mask = valid_mask(target, self.min_depth, self.max_depth, self.crop)
        if self.relative:
            prediction = relative_to_depth(prediction, target, mask, self.max_depth)
        prediction = prediction.clamp(self.min_depth, self.max_depth)
        found = []
        for p, g, m in zip(prediction, target, mask):
            metrics = image_metrics(p, g, m)
            found.append(metrics)
            if metrics is None:
                self.empty += 1
                continue
            self.images += 1
            for key, value in metrics.items():
                self.sums[key] += value
        return found

    def state(self) -> dict:
        return {"sums": dict(self.sums), "images": self.images, "empty": self.empty}

    @staticmethod
    def summarize(states: list[dict]) -> dict:
        images = sum(s["images"] for s in states)
        out = {key: sum(s["sums"][key] for s in states) / images if images else float("nan") for key in METRICS}
        out["images"] = images
        out["images_without_depth"] = sum(s["empty"] for s in states)
        return out
