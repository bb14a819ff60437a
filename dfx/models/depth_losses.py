"""Depth training losses over valid pixels (``mask``; zero depth = no return).

- ``silog`` (Eigen et al. 2014, as BTS / AdaBins train metric depth): with ``g = ln d - ln t`` over
  every valid pixel of the batch, ``scale * sqrt(mean(g^2) - variance_focus * mean(g)^2)``;
  ``variance_focus`` 0.85 and ``scale`` 10 by default (lambda = 1 would be fully scale-invariant).
- ``ssi`` (MiDaS, Ranftl et al. 2020, as DPT trains relative depth): per image, the least-squares
  scale and shift align the prediction to the target on the valid pixels; the loss is the sum of
  squared residuals over the batch divided by twice the number of valid pixels. The target is
  inverse depth (``1 / depth``) for a relative model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfx.data.depth_eval import align_scale_shift


def silog_loss(prediction: Tensor, target: Tensor, mask: Tensor, variance_focus: float = 0.85,
               scale: float = 10.0, eps: float = 1e-6) -> Tensor:
    """prediction, target [B, H, W] metres, mask [B, H, W] bool -> scalar (0 when no pixel is valid)."""
    if not bool(mask.any()):
        return prediction.sum() * 0.0
    g = torch.log(prediction[mask].clamp(min=eps)) - torch.log(target[mask].clamp(min=eps))
    variance = (g * g).mean() - variance_focus * g.mean() ** 2
    return scale * variance.clamp(min=0.0).add(eps).sqrt()


def ssi_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """prediction, target [B, H, W], mask [B, H, W] bool -> scalar: scale-and-shift-invariant MSE."""
    count = mask.sum()
    if not bool(count):
        return prediction.sum() * 0.0
    aligned = align_scale_shift(prediction, target, mask)
    residual = torch.where(mask, aligned - target, torch.zeros_like(target))
    return (residual * residual).sum() / (2 * count)
