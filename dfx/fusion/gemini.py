"""GeminiFusion: pixel-wise fusion of two aligned token streams.

Every token of one modality attends over exactly two candidates: itself (plus a
learned noise vector) and the token at the same position in the other modality.
For direction ``d`` with self tokens ``s`` and other tokens ``o`` (both ``[B, N, C]``)::

    phi = softmax_channels(MLP([s, o]))                    # relation score, [B, N, C]
    keys   = [s + k_noise[d], s * phi]                      # 2 candidates per token
    values = [s + v_noise[d], o]
    y_s = s + MultiheadAttention_d(query=s, keys, values)   # heads over C

Direction 0 updates ``x0`` with ``cross_attn_0_to_1``; direction 1 updates ``x1``
with ``cross_attn_1_to_0``. The relation MLP is shared by both directions.

The forward pass is the same maths as calling ``nn.MultiheadAttention`` per token
with a sequence of two keys, but written out so that it costs a handful of dense
matmuls over all tokens (see ``_fuse_rows``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

# Rows x channels processed together. Chunking bounds the dozen [rows, C] temporaries of
# an inference pass (4 MiB each in float32). On a 2-core CPU, chunks of 2^17 .. 2^22
# elements and no chunking at all timed within 10% of each other at the MiT stage shapes;
# the op count per chunk matters more than cache residency once matmuls dominate.
_CHUNK_ELEMENTS = 1 << 20


class GeminiFusion(nn.Module):
    """Fuse two aligned modalities token by token (cost linear in tokens).

    Args:
        dim: channels ``C`` of both token streams.
        heads: attention heads; must divide ``dim``.

    ``forward(x0, x1)`` takes two ``[B, N, C]`` tensors (same shape, dtype and device)
    and returns ``(y0, y1)``, each ``[B, N, C]``, with ``y = x + fused``.
    Parameter names match the official implementation so its checkpoints load as is.
    """

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.dim = dim
        self.heads = heads
        self.cross_attn_0_to_1 = nn.MultiheadAttention(dim, heads)
        self.cross_attn_1_to_0 = nn.MultiheadAttention(dim, heads)
        self.relation_judger = nn.Sequential(Mlp(2 * dim, dim, dim), nn.Softmax(dim=-1))
        self.k_noise = nn.Embedding(2, dim)
        self.v_noise = nn.Embedding(2, dim)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(x0, x1, self.dim)
        batch, tokens, dim = x0.shape
        rows0 = x0.reshape(batch * tokens, dim)
        rows1 = x1.reshape(batch * tokens, dim)
        weights = self._fused_weights()
        # split (not slice) so that autograd joins the chunk gradients with one cat
        step = max(1, _CHUNK_ELEMENTS // dim)
        chunks = [
            self._fuse_rows(chunk0, chunk1, weights)
            for chunk0, chunk1 in zip(rows0.split(step), rows1.split(step))
        ]
        if len(chunks) == 1:
            y0, y1 = chunks[0]
        else:
            y0 = torch.cat([c[0] for c in chunks])
            y1 = torch.cat([c[1] for c in chunks])
        return y0.view(batch, tokens, dim), y1.view(batch, tokens, dim)

    def _fused_weights(self) -> dict[str, torch.Tensor]:
        """Regroup the parameters so each input row goes through as few matmuls as possible.

        By linearity the noise terms become constant vectors: W_v(s + n_v) = W_v s + W_v n_v,
        and the key bias cancels in the difference of the two logits, leaving W_k n_k.
        ``key_w`` and ``key_b`` hold one entry per direction.
        """
        dim = self.dim
        attn = (self.cross_attn_0_to_1, self.cross_attn_1_to_0)
        w_q, w_k, w_v = zip(*(a.in_proj_weight.chunk(3) for a in attn))
        b_q, _, b_v = zip(*(a.in_proj_bias.chunk(3) for a in attn))
        k_noise_proj = [w_k[d] @ self.k_noise.weight[d] for d in (0, 1)]
        v_self_bias = [b_v[d] + w_v[d] @ self.v_noise.weight[d] for d in (0, 1)]
        fc1 = self.relation_judger[0].fc1
        fc1_on_self, fc1_on_other = fc1.weight[:, :dim], fc1.weight[:, dim:]
        return {
            # x0 -> [query of d0 | self value of d0 | value of x0 as "other" for d1]
            "in0_w": torch.cat([w_q[0], w_v[0], w_v[1]]),
            "in0_b": torch.cat([b_q[0], v_self_bias[0], b_v[1]]),
            "in1_w": torch.cat([w_q[1], w_v[1], w_v[0]]),
            "in1_b": torch.cat([b_q[1], v_self_bias[1], b_v[0]]),
            # relation MLP first layer, fc1 = [A | B]: with S = x0 + x1 and D = x0 - x1,
            # A x0 + B x1 = (A+B)/2 S + (A-B)/2 D and A x1 + B x0 = (A+B)/2 S - (A-B)/2 D,
            # two matmuls for both directions instead of four
            "fc1_w": torch.stack([fc1_on_self + fc1_on_other, fc1_on_self - fc1_on_other]).mul(0.5),
            "fc1_b": torch.stack([fc1.bias, torch.zeros_like(fc1.bias)]).unsqueeze(1),
            "plus_minus": fc1.bias.new_tensor([1.0, -1.0]).view(2, 1, 1),
            "key_w": w_k,
            "key_b": k_noise_proj,
        }

    def _fuse_rows(self, rows0, rows1, weights):
        """Fuse ``[M, C]`` rows of both modalities; returns ``(y0, y1)``, each ``[M, C]``."""
        dim = rows0.shape[1]
        mlp = self.relation_judger[0]
        plus_minus = weights["plus_minus"]
        sum_diff = torch.addcmul(rows0, rows1, plus_minus)  # [2, M, C]: x0 + x1, x0 - x1
        fc1_parts = torch.baddbmm(weights["fc1_b"], sum_diff, weights["fc1_w"].transpose(1, 2))
        hidden = torch.addcmul(*fc1_parts.unbind(), plus_minus)  # [2, M, C]: direction 0, 1
        phi0, phi1 = self.relation_judger[1](mlp.fc2(mlp.act(hidden))).unbind()
        proj0 = F.linear(rows0, weights["in0_w"], weights["in0_b"])
        proj1 = F.linear(rows1, weights["in1_w"], weights["in1_b"])
        query0, value_self0, value_x0_for_1 = proj0.split(dim, -1)
        query1, value_self1, value_x1_for_0 = proj1.split(dim, -1)
        key_w, key_b = weights["key_w"], weights["key_b"]
        y0 = self._attend(rows0, phi0, query0, value_self0, value_x1_for_0, key_w[0], key_b[0],
                          self.cross_attn_0_to_1.out_proj)
        y1 = self._attend(rows1, phi1, query1, value_self1, value_x0_for_1, key_w[1], key_b[1],
                          self.cross_attn_1_to_0.out_proj)
        return y0, y1

    def _attend(self, rows, phi, query, value_self, value_other, key_w, key_b, out_proj):
        """Two-candidate attention for one direction; every tensor is ``[M, C]``.

        ``query`` = W_q s + b_q, ``value_self`` = W_v (s + n_v) + b_v, ``value_other``
        = W_v o + b_v. The softmax over two logits is the sigmoid of their difference
        q . (k_self - k_other) = q . (W_k (s - s * phi) + W_k n_k): the key bias cancels.
        """
        m, dim = rows.shape
        heads, head_dim = self.heads, dim // self.heads
        key_diff = F.linear(torch.addcmul(rows, rows, phi, value=-1), key_w, key_b)
        logit_diff = (query * key_diff).view(m, heads, head_dim).sum(-1, keepdim=True)
        # cast back: under autocast the sum runs in float32 while the values are half
        weight_self = torch.sigmoid(logit_diff * head_dim**-0.5).to(value_self.dtype)
        mixed = torch.lerp(value_other.view(m, heads, head_dim), value_self.view(m, heads, head_dim),
                           weight_self)
        return rows + out_proj(mixed.view(m, dim))


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_inputs(x0: torch.Tensor, x1: torch.Tensor, dim: int) -> None:
    for name, x in (("x0", x0), ("x1", x1)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"{name} must have shape [B, N, {dim}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {list(x0.shape)} and {list(x1.shape)}")
    if x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(
            f"x0 and x1 must share dtype and device, got {x0.dtype}/{x0.device} and {x1.dtype}/{x1.device}"
        )
