"""Deformable encoder and decoder.

Shapes: ``B`` images, ``S`` = Σ H_l·W_l flattened multi-scale tokens, ``Q`` queries, ``C`` width,
``L`` levels. Reference points are normalised to the *valid* (unpadded) part of each image and
scaled by the per-level valid ratios before sampling, because the padded maps are what is sampled.

Positional queries: Deformable-DETR / H-DETR compute one per query before the decoder and reuse it
in every layer; DINO (``Decoder(per_layer_position=True)``) rebuilds it in each layer from that
layer's reference box (scaled by the level-0 valid ratios): its sine encoding in (y, x, w, h) order
through ``ref_point_head`` (an MLP 2C -> C -> C).

Decoder self-attention sees the queries in groups (H-DETR's one-to-one and one-to-many groups)
that must not attend to each other. Two equivalent ways are offered: ``grouped`` runs one attention
per group (cheaper: Σ n_g² instead of (Σ n_g)² pairs), ``masked`` runs one attention over all
queries with :func:`group_attention_mask`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfx.detection.deformable_attention import MultiScaleDeformableAttention
from dfx.detection.position import box_position_encoding

INVERSE_SIGMOID_EPS = 1e-5  # Deformable-DETR's; DINO and detrex use 1e-3


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``layers`` linear layers with ReLU between them (the box head: dim -> dim -> dim -> 4)."""

    def __init__(self, dim: int, hidden: int, out: int, layers: int):
        super().__init__()
        sizes = [dim] + [hidden] * (layers - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = x.relu()
        return x


def group_attention_mask(sizes: list[int], device=None) -> Tensor:
    """[Q, Q] bool, True where query i may NOT attend to key j (they lie in different groups)."""
    # group ids built on the host: repeat_interleave by a device tensor reads its sum back
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device, non_blocking=True)
    return group[:, None] != group[None, :]


def _ffn(dim: int, ffn_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim),
                         nn.Dropout(dropout))


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then an FFN (post-norm)."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, heads, levels, points)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = _ffn(dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]],
                padding_mask: Tensor):
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, reference, src, shapes, padding_mask)))
        return self.norm2(src + self.ffn(src))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, **layer):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, [B, S, L, 2] (x, y), in each level's sampling frame."""
        points = []
        for level, (height, width) in enumerate(shapes):
            # arange + 0.5, not linspace(0.5, n - 0.5, n): the same numbers, but the ONNX exporter's
            # linspace divides by n - 1, which is NaN for a 1-pixel level (non-square or small inputs)
            ys, xs = torch.meshgrid(
                torch.arange(height, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5,
                torch.arange(width, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5,
                indexing="ij")
            x = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
            y = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
            points.append(torch.stack((x, y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, shapes: list[tuple[int, int]], valid_ratios, padding_mask):
        """src, pos [B, S, C]; shapes: (H, W) per level as Python ints (no device tensor to read back)."""
        reference = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference, shapes, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """Self-attention among the queries (within groups), deformable cross-attention, FFN."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MultiScaleDeformableAttention(dim, heads, levels, points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _ffn(dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)

    def _self_attention(self, tgt: Tensor, query_pos: Tensor, groups: list[int], mask: Tensor | None) -> Tensor:
        """Per group (``mask`` None), or all queries at once with ``mask`` (group_attention_mask)."""
        q = tgt + query_pos
        if mask is not None:
            return self.self_attn(q, q, tgt, attn_mask=mask, need_weights=False)[0]
        outs = [self.self_attn(qg, qg, vg, need_weights=False)[0]
                for qg, vg in zip(q.split(groups, 1), tgt.split(groups, 1))]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def forward(self, tgt, query_pos, reference, memory, shapes, memory_mask, groups: list[int],
                mask: Tensor | None = None):
        tgt = self.norm1(tgt + self.dropout1(self._self_attention(tgt, query_pos, groups, mask)))
        attended = self.cross_attn(tgt + query_pos, reference, memory, shapes, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.ffn(tgt))


class Decoder(nn.Module):
    """Decoder layers with per-layer box predictions.

    box_refine: each layer refines its reference into a new box, the next layer's reference
    (detached).
    look_forward_twice: layer l's prediction is built on layer l-1's refined box *with* its
    gradient, so layer l's box loss trains box heads l and l-1; that refined box was itself built on
    a detached reference, so the gradient goes no further back.
    per_layer_position: DINO's positional queries, rebuilt in every layer from its reference box
    (``ref_point_head``); the ``query_pos`` argument is then ignored.
    final_norm: DINO's LayerNorm on what the heads read (the returned states); the next layer's
    reference is still refined from the un-normalised output, as in the reference.
    eps: of :func:`inverse_sigmoid` in the refinement (Deformable-DETR 1e-5, DINO 1e-3).
    """

    def __init__(self, num_layers: int, box_refine: bool, look_forward_twice: bool, *,
                 per_layer_position: bool = False, final_norm: bool = False, eps: float = INVERSE_SIGMOID_EPS,
                 **layer):
        super().__init__()
        dim = layer["dim"]
        self.layers = nn.ModuleList(DecoderLayer(**layer) for _ in range(num_layers))
        self.box_refine = box_refine
        self.look_forward_twice = look_forward_twice and box_refine
        self.ref_point_head = MLP(2 * dim, dim, dim, 2) if per_layer_position else None
        self.norm = nn.LayerNorm(dim) if final_norm else None
        self.eps = eps

    def box_position(self, sampling_ref: Tensor) -> Tensor:
        """DINO's positional query of references [B, Q, 4] already scaled by the valid ratios -> [B, Q, C]."""
        sine = box_position_encoding(sampling_ref[..., [1, 0, 2, 3]], self.ref_point_head.layers[0].in_features // 4)
        return self.ref_point_head(sine)

    def forward(self, tgt: Tensor, query_pos: Tensor | None, reference: Tensor, memory: Tensor,
                shapes: list[tuple[int, int]], valid_ratios: Tensor, memory_mask: Tensor, box_head, groups: list[int],
                masked: bool = False, attn_mask: Tensor | None = None):
        """reference [B, Q, 2|4] in [0, 1]; shapes (H, W) per memory level, Python ints;
        box_head(layer, states) -> box deltas [B, Q, 4].
        attn_mask [Q, Q] (True: may not attend) replaces the group mask, e.g. DINO's denoising mask.

        Returns per layer: states [B, Q, C] (what the heads read) and boxes [B, Q, 4] (cxcywh in [0, 1]).
        """
        states, boxes = [], []
        mask = group_attention_mask(groups, tgt.device) if masked and len(groups) > 1 else None  # once, all layers
        if attn_mask is not None:
            mask = attn_mask
        sampling_ref, prediction_ref = reference, reference
        for index, layer in enumerate(self.layers):
            # a point reference becomes a box after the first refinement
            scale = valid_ratios if sampling_ref.shape[-1] == 2 else torch.cat((valid_ratios, valid_ratios), -1)
            scaled = sampling_ref[:, :, None] * scale[:, None]
            if self.ref_point_head is not None:
                query_pos = self.box_position(scaled[:, :, 0])
            tgt = layer(tgt, query_pos, scaled, memory, shapes, memory_mask, groups, mask)
            state = tgt if self.norm is None else self.norm(tgt)
            delta = box_head(index, state)
            states.append(state)
            boxes.append(_refine(prediction_ref, delta, self.eps))
            if self.box_refine:
                # with the final norm, the next reference comes from the un-normalised output
                refine_delta = delta if self.norm is None else box_head(index, tgt)
                refined = _refine(sampling_ref, refine_delta, self.eps)  # its gradient stops here
                sampling_ref = refined.detach()
                prediction_ref = refined if self.look_forward_twice else sampling_ref
        return states, boxes


def _refine(reference: Tensor, delta: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """A box [B, Q, 4] from a reference [B, Q, 2|4] in [0, 1] and deltas before the sigmoid."""
    base = inverse_sigmoid(reference, eps)
    if base.shape[-1] == 2:
        base = torch.cat((base, torch.zeros_like(base)), -1)
    return (delta + base).sigmoid()
