"""Point-sampled mask losses and matching costs (Mask2Former's, which MaskDINO uses).

Masks are compared at points, not on whole maps: a prediction [H4, W4] (logits on the padded
batch's stride-4 grid) and its target [H, W] (0/1 on the padded batch's pixel grid) are both read
at the same points ``(x, y)`` in [0, 1]² of that frame, bilinearly (``grid_sample``,
``align_corners=False``), so neither is resized.

- **Loss points** (:func:`uncertain_points`): ``oversample · P`` uniform random points, of which the
  ``importance · P`` most uncertain under the prediction (uncertainty = -|logit|) are kept, plus
  ``P - importance · P`` fresh uniform points. Chosen without gradient.
- **Matching points**: ``P`` uniform random points shared by every prediction and target of an image.

For a mask with logits ``x`` and target ``t`` at its ``P`` points, ``p = sigmoid(x)``::

    BCE  = mean_points BCE_with_logits(x, t)
    dice = 1 - (2 Σ p·t + 1) / (Σ p + Σ t + 1)

the losses sum them over the matched masks and divide by the number of target masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """maps [N, H, W], points [N, P, 2] (x, y) in [0, 1] -> bilinear values [N, P] (zeros outside)."""
    grid = 2.0 * points[:, :, None] - 1.0  # grid_sample's [-1, 1] frame: [N, P, 1, 2]
    return F.grid_sample(maps[:, None], grid.to(maps.dtype), align_corners=False)[:, 0, :, 0]


@torch.no_grad()
def uncertain_points(logits: Tensor, points: int, oversample: float, importance: float) -> Tensor:
    """logits [N, H, W] -> [N, points, 2] points: the ``int(importance · points)`` most uncertain of
    ``int(oversample · points)`` uniform candidates (uncertainty -|logit|), then uniform ones."""
    candidates = torch.rand(logits.shape[0], int(oversample * points), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates).abs()
    kept = int(importance * points)
    top = uncertainty.topk(kept, dim=1).indices
    chosen = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    fresh = torch.rand(logits.shape[0], points - kept, 2, device=logits.device)
    return torch.cat((chosen, fresh), 1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """logits, targets [N, P] -> per-mask dice loss [N]."""
    probs = logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def mask_losses(logits: Tensor, targets: Tensor, num_masks: float, points: int, oversample: float,
                importance: float) -> tuple[Tensor, Tensor]:
    """Matched predictions [M, H4, W4] (logits) and their targets [M, H, W] (0/1) -> (BCE, dice),
    each summed over the M masks and divided by ``num_masks``."""
    if not len(logits):
        zero = logits.sum() * 0.0  # keeps the graph connected when nothing is matched
        return zero, zero
    chosen = uncertain_points(logits.detach().float(), points, oversample, importance)
    sampled = point_sample(logits.float(), chosen)
    labels = point_sample(targets.float(), chosen)
    bce = F.binary_cross_entropy_with_logits(sampled, labels, reduction="none").mean(-1)
    return bce.sum() / num_masks, dice_loss(sampled, labels).sum() / num_masks


@torch.no_grad()
def mask_costs(logits: Tensor, targets: Tensor, points: int) -> tuple[Tensor, Tensor]:
    """Predictions [Q, H4, W4] (logits) x targets [T, H, W] (0/1) -> (BCE cost, dice cost), each
    [Q, T], on ``points`` uniform random points shared by all of them."""
    chosen = torch.rand(1, points, 2, device=logits.device)
    x = point_sample(logits.float(), chosen.expand(len(logits), -1, -1))
    t = point_sample(targets.to(x.device, torch.float32), chosen.expand(len(targets), -1, -1))
    # BCE(x, t) = t·BCE(x, 1) + (1 - t)·BCE(x, 0), so the pairwise mean is two matrix products
    positive = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    negative = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    bce = (positive @ t.T + negative @ (1 - t).T) / points
    probs = x.sigmoid()
    dice = 1 - (2 * probs @ t.T + 1) / (probs.sum(-1)[:, None] + t.sum(-1)[None] + 1)
    return bce, dice
