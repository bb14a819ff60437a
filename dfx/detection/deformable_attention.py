"""The multi-scale deformable attention layer (projections around ``dfx.ops.ms_deform_attn``).

Each query predicts, per head, level and point, a sampling offset and an attention weight
(softmax over levels × points) from its own features. Offsets are relative to a reference:

- a point ``(x, y)``: ``loc = ref + offset / (W_l, H_l)`` (offsets in pixels of level ``l``);
- a box ``(cx, cy, w, h)``: ``loc = ref_xy + offset / points · ref_wh / 2`` (offsets in box units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dfx.ops import host_tensor, ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """query [B, Q, C], reference [B, Q, L, 2|4], value input [B, S, C] -> [B, Q, C]."""

    def __init__(self, dim: int = 256, heads: int = 8, levels: int = 4, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must divide by heads {heads}")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as a fixed pattern: head m looks along direction 2πm/heads, point p at
        # distance p + 1, so the heads cover the neighbourhood before any training.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        directions = torch.stack((angles.cos(), angles.sin()), -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        pattern = directions[:, None, None, :].repeat(1, self.levels, self.points, 1)
        pattern *= torch.arange(1, self.points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(pattern.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor,
                spatial_shapes: Tensor | Sequence[tuple[int, int]], padding_mask: Tensor | None = None) -> Tensor:
        """spatial_shapes: (H, W) per level, as Python int pairs (what the detector passes: nothing
        to read back from the device) or a [L, 2] long tensor; padding_mask [B, S] True at padding."""
        batch, num_queries, _ = query.shape
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (self.heads, -1))  # [B, S, M, D]
        offsets = self.sampling_offsets(query).view(batch, num_queries, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(batch, num_queries, self.heads, self.levels, self.points)
        if reference.shape[-1] == 2:
            if isinstance(spatial_shapes, Tensor):
                normaliser = spatial_shapes.flip(-1).to(offsets.dtype)  # (W, H) per level
            else:
                normaliser = host_tensor([(w, h) for h, w in spatial_shapes], offsets.dtype, offsets.device)
            locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference.shape[-1] == 4:
            centre, size = reference[:, :, None, :, None, :2], reference[:, :, None, :, None, 2:]
            locations = centre + offsets / self.points * size * 0.5
        else:
            raise ValueError(f"reference must end in 2 (points) or 4 (boxes), got {tuple(reference.shape)}")
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))
