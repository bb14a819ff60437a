"""Fusion strategies for two aligned token streams, and the merge of extra modalities.

Every in-block fusion module has the interface of :class:`dfx.fusion.GeminiFusion`:
``forward(x0, x1) -> (y0, y1)``, all ``[B, N, C]``, token ``n`` of ``x0`` and of ``x1`` lying
at the same pixel. The dual-modality MiT (dfx.fusion.mit) calls one after the self-attention of
every block (before the output projection). ``model.fusion`` picks one of :data:`FUSIONS`:

- ``none``: one modality (the first), no fusion: the single-modality baseline.
- ``concat``: early fusion: the modalities are stacked along channels at the input and one
  stream runs (only the first patch embedding differs). No in-block module.
- ``exchange``: :class:`TokenExchange`, TokenFusion-style token substitution.
- ``cross-attn``: :class:`CrossModalAttention`, every token attends over all tokens of the
  other modality (quadratic in tokens).
- ``gemini``: :class:`dfx.fusion.GeminiFusion`, each token attends over itself and the token at
  its own position in the other modality (linear in tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfx.fusion.gemini import GeminiFusion

FUSIONS = ("none", "concat", "exchange", "cross-attn", "gemini")
# strategies that run one stream per modality (with shared weights) and fuse inside the blocks
TWO_STREAM = ("exchange", "cross-attn", "gemini")


class CrossModalAttention(nn.Module):
    """Full cross-modal attention: each token of x0 attends over all tokens of x1 and vice versa.

    ``forward(x0, x1)`` with ``[B, N, C]`` inputs -> ``(y0, y1)``, ``y = x + attention output``.
    One query / key-value / output projection per direction; ``heads`` split the channels.
    Cost O(N^2 C): the baseline GeminiFusion's per-pixel attention replaces.
    """

    def __init__(self, dim: int, heads: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.query = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.key_value = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(2))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = []
        for d, (s, o) in enumerate(((x0, x1), (x1, x0))):
            q = self.query[d](s).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, h, N, c]
            k, v = self.key_value[d](o).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
            fused = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            outputs.append(s + self.out[d](fused))
        return outputs[0], outputs[1]


class TokenExchange(nn.Module):
    """TokenFusion-style exchange (simplified): low-scored tokens are replaced by the other modality's.

    Per modality ``m`` a small MLP scores every token, ``s_m = sigmoid(MLP_m(x_m))`` in (0, 1)
    (``[B, N, 1]``). A token whose score is below ``threshold`` is replaced by the token at the same
    position of the other modality; the others are kept, scaled by their score (which is how the
    task loss reaches the scorer)::

        y_m = x_other  where s_m < threshold,  else  s_m * x_m

    ``sparsity`` (set by every forward) is the mean score of both modalities; the task adds it,
    weighted, to the loss (TokenFusion's L1 penalty), which pushes uninformative tokens below the
    threshold. Differences from TokenFusion: one scorer per modality and block applied to the
    attention output (where every dfx fusion module sits) instead of the residual stream, and
    the replacement token is the other modality's token as is (no projection).
    """

    def __init__(self, dim: int, threshold: float = 0.02, hidden_ratio: float = 0.25):
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.threshold = threshold
        self.score = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1)) for _ in range(2)
        )
        self.sparsity: torch.Tensor | None = None
        self.exchanged: torch.Tensor | float = 0.0  # share of tokens replaced in the last forward (both modalities)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = torch.sigmoid(self.score[0](x0))
        s1 = torch.sigmoid(self.score[1](x1))
        swap0, swap1 = s0 < self.threshold, s1 < self.threshold
        y0 = torch.where(swap0, x1, x0 * s0)
        y1 = torch.where(swap1, x0, x1 * s1)
        self.sparsity = 0.5 * (s0.mean() + s1.mean())
        self.exchanged = (0.5 * (swap0.float().mean() + swap1.float().mean())).detach()  # no host read in the step
        return y0, y1


def build_fusion(name: str, dim: int, heads: int, exchange_threshold: float = 0.02) -> nn.Module | None:
    """The in-block fusion module of strategy ``name`` for ``dim`` channels (None: no module)."""
    if name == "gemini":
        return GeminiFusion(dim, heads=8 if dim % 8 == 0 else heads)
    if name == "cross-attn":
        return CrossModalAttention(dim, heads=heads)
    if name == "exchange":
        return TokenExchange(dim, threshold=exchange_threshold)
    if name in ("none", "concat"):
        return None
    raise ValueError(f"unknown fusion {name!r}; known: {', '.join(FUSIONS)}")


class ModalityMerge(nn.Module):
    """Merge K extra modalities into one stream (GeminiFusion's DeLiVER model, more than two modalities).

    ``forward(xs, grid)``: K token tensors ``[B, N, C]`` on a ``grid = (h, w)`` token map ->
    ``(merged [B, N, C], reweighted: K x [B, N, C])``. Each input gets a per-token score from its
    own small conv net on the token map (3x3 depthwise conv, 1x1 conv to one channel, sigmoid):
    ``s_k = sigmoid(conv1x1(dwconv3x3(x_k)))``; it is re-weighted as ``x_k + s_k * x_k``; the merged
    stream is the element-wise maximum over k. The re-weighted inputs are returned too: the
    backbone hands them (plus the merged stream's stage output) to the next stage.
    Parameter names follow the reference's ``extra_score_predictor.<stage>.score_nets.<k>``.
    """

    def __init__(self, dim: int, inputs: int):
        super().__init__()
        self.score_nets = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.Conv2d(dim, 1, 1), nn.Sigmoid())
            for _ in range(inputs)
        )

    def forward(self, xs: list[torch.Tensor], grid: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(xs) != len(self.score_nets):
            raise ValueError(f"expected {len(self.score_nets)} modality streams to merge, got {len(xs)}")
        reweighted = []
        for x, score_net in zip(xs, self.score_nets):
            batch, _, dim = x.shape
            score = score_net(x.transpose(1, 2).reshape(batch, dim, *grid)).flatten(2).transpose(1, 2)  # [B, N, 1]
            reweighted.append(x + score * x)
        return torch.stack(reweighted).amax(0), reweighted
