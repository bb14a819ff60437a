"""Sine position encodings: of feature-map pixels (encoder) and of boxes (two-stage queries).

Both follow the Transformer recipe: a coordinate ``u`` scaled to ``[0, 2π]`` is divided by
``temperature ** (2 ⌊i/2⌋ / F)`` for ``i < F`` and passed through sin (even ``i``) and cos (odd
``i``), so nearby positions get nearby codes at every frequency.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TWO_PI = 2 * math.pi


def _frequencies(num_feats: int, temperature: float, device, dtype) -> Tensor:
    index = torch.arange(num_feats, device=device, dtype=dtype)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)


def _sin_cos(coordinate: Tensor, frequencies: Tensor) -> Tensor:
    """coordinate [...] -> [..., F]: sin at even channels, cos at odd ones (interleaved)."""
    angles = coordinate[..., None] / frequencies
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def pixel_position_encoding(mask: Tensor, num_feats: int = 128, temperature: float = 10000.0,
                            offset: float = -0.5) -> Tensor:
    """Encoding of every valid pixel of a padded feature map.

    mask [B, H, W] bool, True at padding. Coordinates count valid pixels from the top-left (1-based)
    and are normalised by the valid extent of each image, so an image means the same positions
    whatever the padding of its batch: ``(i + 1 + offset) / H_valid``. ``offset`` -0.5 gives pixel
    centres (Deformable-DETR, detrex); DINO's own code uses 0 (and temperature 20).
    Returns [B, 2 * num_feats, H, W]: y channels first, then x.
    """
    valid = (~mask).to(torch.float32)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps = 1e-6
    y = (y + offset) / (y[:, -1:, :] + eps) * TWO_PI
    x = (x + offset) / (x[:, :, -1:] + eps) * TWO_PI
    frequencies = _frequencies(num_feats, temperature, mask.device, torch.float32)
    encoding = torch.cat((_sin_cos(y, frequencies), _sin_cos(x, frequencies)), dim=-1)  # [B, H, W, 2F]
    return encoding.permute(0, 3, 1, 2)


def box_position_encoding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Encoding of normalised boxes [..., 4] (cx, cy, w, h in [0, 1]) -> [..., 4 * num_feats]."""
    frequencies = _frequencies(num_feats, temperature, boxes.device, boxes.dtype)
    return _sin_cos(boxes * TWO_PI, frequencies).flatten(-2)
