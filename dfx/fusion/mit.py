"""Multi-modal Mix Transformer (SegFormer's MiT-B0..B5) with fusion inside every block.

Two or more aligned modalities ``images [B, M, 3, H, W]`` run through ONE set of linear and conv
weights; only the LayerNorms are per stream (``<norm>.ln_<s>``). Streams are stacked along the
batch axis (``[S*B, ...]``), so every shared layer is one call for all modalities. Four stages;
stage ``i`` is an overlapping patch embedding (conv k7/s4 for stage 1, k3/s2 after), ``depths[i]``
blocks and a LayerNorm. A block is

    x = x + drop_path(proj(fusion(attention(norm1(x)))))       # efficient self-attention
    x = x + drop_path(fc2(gelu(dwconv3x3(fc1(norm2(x))))))      # Mix-FFN

where attention uses keys/values from a ``sr_ratio``-strided conv of the token map (spatial
reduction) and ``fusion`` is the strategy's module (dfx.fusion.strategies) applied to the two
streams' attention outputs before the output projection; ``none`` and ``concat`` run one stream
with no fusion module.

With more than two modalities (DeLiVER-style RGB + depth + event + LiDAR), the first modality is
stream 0 and the others are merged into stream 1 at every stage, as GeminiFusion's DeLiVER model
does: stage ``i`` patch-embeds every input (shared conv, a LayerNorm per input), scores and
re-weights the extra inputs and merges them with :class:`~dfx.fusion.strategies.ModalityMerge`
(element-wise maximum) into stream 1 before the blocks. The next stage's extra inputs are the
re-weighted extra embeddings plus stream 1's stage output (both as token maps).

Parameter names follow the official SegFormer ``mit_b*`` checkpoints (``patch_embed1.proj``,
``block1.0.attn.q`` / ``kv`` / ``sr`` / ``proj``, ``block1.0.mlp.fc1`` / ``dwconv.dwconv`` /
``fc2``, ``norm1`` ...), with ``.ln_<s>`` inserted in every LayerNorm: see
:func:`load_mit_weights`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from dfx.errors import RunError
from dfx.fusion.strategies import FUSIONS, TWO_STREAM, ModalityMerge, build_fusion

# The published MiT family (SegFormer, Xie et al. 2021): widths, depths; the rest is shared.
MIT_VARIANTS = {
    "b0": {"embed_dims": [32, 64, 160, 256], "depths": [2, 2, 2, 2]},
    "b1": {"embed_dims": [64, 128, 320, 512], "depths": [2, 2, 2, 2]},
    "b2": {"embed_dims": [64, 128, 320, 512], "depths": [3, 4, 6, 3]},
    "b3": {"embed_dims": [64, 128, 320, 512], "depths": [3, 4, 18, 3]},
    "b4": {"embed_dims": [64, 128, 320, 512], "depths": [3, 8, 27, 3]},
    "b5": {"embed_dims": [64, 128, 320, 512], "depths": [3, 6, 40, 3]},
}
MIT_SHARED = {"num_heads": [1, 2, 5, 8], "mlp_ratios": [4, 4, 4, 4], "sr_ratios": [8, 4, 2, 1]}
LN_EPS = 1e-6  # the official checkpoints were trained with eps 1e-6


class ModalityLayerNorm(nn.Module):
    """One LayerNorm per stream (``ln_0``, ``ln_1``, ...) over inputs stacked as ``[S*B, ..., C]``."""

    def __init__(self, dim: int, streams: int):
        super().__init__()
        self.streams = streams
        for s in range(streams):
            self.add_module(f"ln_{s}", nn.LayerNorm(dim, eps=LN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.streams == 1:
            return self.ln_0(x)
        return torch.cat([getattr(self, f"ln_{s}")(part) for s, part in enumerate(x.chunk(self.streams))])


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then a per-stream LayerNorm.

    ``[S*B, C_in, H, W] -> tokens [S*B, h*w, C], (h, w)`` with ``h = ceil(H / stride)``.
    """

    def __init__(self, patch_size: int, stride: int, in_chans: int, dim: int, streams: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = ModalityLayerNorm(dim, streams)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class EfficientAttention(nn.Module):
    """Multi-head self-attention with spatially reduced keys/values, then the fusion module.

    ``forward(x [S*B, N, C], grid)``: keys and values come from the token map reduced by a
    ``sr_ratio`` x ``sr_ratio`` strided conv (+ per-stream LayerNorm), cost O(N^2 C / sr^2).
    The attention output of each stream (before ``proj``) goes through ``fusion`` when present.
    """

    def __init__(self, dim: int, heads: int, sr_ratio: int, streams: int, fusion: nn.Module | None):
        super().__init__()
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = ModalityLayerNorm(dim, streams)
        self.fusion = fusion

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        rows, tokens, dim = x.shape
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [S*B, heads, N, c]
        source = x
        if self.sr_ratio > 1:
            source = self.sr(x.transpose(1, 2).reshape(rows, dim, *grid)).flatten(2).transpose(1, 2)
            source = self.norm(source)
        k, v = self.kv(source).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, tokens, dim)
        if self.fusion is not None:
            out = torch.cat(self.fusion(*out.chunk(2)))
        return self.proj(out)


class DWConv(nn.Module):
    """3x3 depthwise conv on the token map: ``[S*B, N, C], grid -> [S*B, N, C]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        rows, _, dim = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(rows, dim, *grid)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2 (the conv gives positional information)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), grid)))


class Block(nn.Module):
    """Pre-norm transformer block: efficient attention (+ fusion) and Mix-FFN, per-stream norms."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float, streams: int,
                 fusion: nn.Module | None):
        super().__init__()
        self.norm1 = ModalityLayerNorm(dim, streams)
        self.attn = EfficientAttention(dim, heads, sr_ratio, streams, fusion)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = ModalityLayerNorm(dim, streams)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x), grid))


class MultiModalMiT(nn.Module):
    """The MiT backbone over ``modalities`` aligned inputs with fusion strategy ``fusion``.

    ``forward(images [B, M, C_in, H, W])`` -> four feature maps ``[S, B, C_i, H/2^(i+2), W/2^(i+2)]``
    (strides 4, 8, 16, 32), ``S`` = :attr:`streams` (2 for the in-block strategies, 1 for ``none``,
    which reads modality 0 only, and ``concat``, which stacks all modalities along channels).
    ``variant`` picks the published sizes; explicit ``embed_dims`` / ``depths`` / ``num_heads`` /
    ``mlp_ratios`` / ``sr_ratios`` replace them (e.g. a tiny model for tests).
    """

    def __init__(self, variant: str = "b0", modalities: int = 2, fusion: str = "gemini", in_chans: int = 3,
                 drop_path_rate: float = 0.0, exchange_threshold: float = 0.02, **sizes):
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant {variant!r}; known: {', '.join(MIT_VARIANTS)}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
        unknown = set(sizes) - {*MIT_VARIANTS["b0"], *MIT_SHARED}
        if unknown:
            raise ValueError(f"unknown MiT size argument(s) {sorted(unknown)}; known: "
                             f"{', '.join([*MIT_VARIANTS['b0'], *MIT_SHARED])}")
        cfg = {**MIT_SHARED, **MIT_VARIANTS[variant], **sizes}
        if any(len(cfg[k]) != 4 for k in cfg):
            raise ValueError(f"MiT sizes need four values (one per stage), got {cfg}")
        if fusion in TWO_STREAM and modalities < 2:
            raise ValueError(f"fusion {fusion!r} needs at least two modalities, got {modalities}")
        self.variant, self.fusion, self.modalities = variant, fusion, modalities
        self.embed_dims = list(cfg["embed_dims"])
        self.streams = 2 if fusion in TWO_STREAM else 1
        # streams through the patch embeddings: all modalities for in-block fusion (extras merged)
        self.embed_streams = modalities if fusion in TWO_STREAM else 1
        stem_chans = in_chans * modalities if fusion == "concat" else in_chans
        rates = torch.linspace(0, drop_path_rate, sum(cfg["depths"])).tolist()
        for i, (dim, depth) in enumerate(zip(cfg["embed_dims"], cfg["depths"]), 1):
            previous = stem_chans if i == 1 else cfg["embed_dims"][i - 2]
            self.add_module(f"patch_embed{i}", OverlapPatchEmbed(7 if i == 1 else 3, 4 if i == 1 else 2, previous,
                                                                 dim, self.embed_streams))
            heads, first = cfg["num_heads"][i - 1], sum(cfg["depths"][: i - 1])
            self.add_module(f"block{i}", nn.ModuleList(
                Block(dim, heads, cfg["mlp_ratios"][i - 1], cfg["sr_ratios"][i - 1], rates[first + j], self.streams,
                      build_fusion(fusion, dim, heads, exchange_threshold))
                for j in range(depth)))
            self.add_module(f"norm{i}", ModalityLayerNorm(dim, self.streams))
            if self.embed_streams > 2:
                self.add_module(f"merge{i}", ModalityMerge(dim, self.embed_streams - 1))
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 5 or images.shape[1] != self.modalities:
            raise ValueError(f"expected images [B, {self.modalities}, C, H, W] (one image per modality), "
                             f"got {list(images.shape)}")
        batch = images.shape[0]
        if self.fusion == "none":
            inputs = [images[:, 0]]
        elif self.fusion == "concat":
            inputs = [images.flatten(1, 2)]
        else:
            inputs = list(images.unbind(1))
        features = []
        for i in range(1, 5):
            tokens, grid = getattr(self, f"patch_embed{i}")(torch.cat(inputs))
            parts = tokens.chunk(len(inputs))
            extras = []
            if len(parts) > 2:  # the extra modalities become stream 1
                merged, extras = getattr(self, f"merge{i}")(list(parts[1:]), grid)
                parts = (parts[0], merged)
            x = torch.cat(parts)
            for block in getattr(self, f"block{i}"):
                x = block(x, grid)
            x = getattr(self, f"norm{i}")(x)
            maps = x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
            features.append(maps.view(self.streams, batch, *maps.shape[1:]))
            inputs = list(maps.chunk(self.streams))
            if extras:  # re-weighted extras plus the merged stream's output feed the next stage
                inputs = [inputs[0], *(e.transpose(1, 2).reshape(batch, -1, *grid) + inputs[1] for e in extras)]
        return features

    def fusion_modules(self) -> list[nn.Module]:
        return [block.attn.fusion for i in range(1, 5) for block in getattr(self, f"block{i}")
                if block.attn.fusion is not None]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_STREAM_NORM = re.compile(r"\.ln_\d+(?=\.)")
_OFFICIAL_PREFIXES = ("backbone.", "module.", "encoder.")


def official_name(name: str) -> str:
    """The single-modality SegFormer name of a dfx MiT parameter: ``.ln_<s>`` removed."""
    return _STREAM_NORM.sub("", name)


def load_mit_weights(backbone: MultiModalMiT, state: dict[str, torch.Tensor], source: str = "weights") -> dict:
    """Copy an official SegFormer ``mit_b*`` state dict into ``backbone`` (in place).

    Shared layers take the tensor as is; every per-stream LayerNorm ``x.ln_<s>`` takes the single
    ``x`` of the checkpoint. The ``concat`` stem (``patch_embed1.proj.weight`` over 3M channels)
    takes the RGB kernel tiled over the modalities and divided by M. Keys prefixed ``backbone.``
    (mmseg SegFormer checkpoints) are accepted. The classifier (``head.*``) and the fusion and
    merge modules are not in the checkpoint and stay as initialised.

    Returns ``{"loaded": n, "not_in_checkpoint": [...], "unused": [...]}``; raises RunError when a
    backbone tensor is missing or has another shape (e.g. B3 weights for a B0 model).
    """
    for prefix in _OFFICIAL_PREFIXES:
        if state and all(k.startswith(prefix) for k in state if not k.startswith("decode_head.")):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = backbone.state_dict()
    updated, used, absent = {}, set(), []
    for name, tensor in own.items():
        key = official_name(name)
        if key not in state:
            absent.append(name)
            continue
        value = state[key]
        if key == "patch_embed1.proj.weight" and backbone.fusion == "concat" and value.shape[1] * backbone.modalities \
                == tensor.shape[1]:
            value = value.repeat(1, backbone.modalities, 1, 1) / backbone.modalities
        if value.shape != tensor.shape:
            raise RunError(f"{source}: {key} has shape {list(value.shape)} but MiT-{backbone.variant.upper()} "
                           f"expects {list(tensor.shape)}; is this the checkpoint of another MiT variant?")
        updated[name] = value.to(tensor.dtype)
        used.add(key)
    backbone_missing = [n for n in absent if not _is_fusion_parameter(n)]
    if backbone_missing:
        example = ", ".join(official_name(n) for n in backbone_missing[:3])
        raise RunError(f"{source}: not a SegFormer mit_b* state dict: {len(backbone_missing)} backbone tensors are "
                       f"missing (e.g. {example}); expected names such as patch_embed1.proj.weight, "
                       f"block1.0.attn.q.weight, block1.0.mlp.dwconv.dwconv.weight, norm1.weight")
    backbone.load_state_dict(updated, strict=False)
    return {"loaded": len(updated), "not_in_checkpoint": absent, "unused": sorted(set(state) - used)}


def _is_fusion_parameter(name: str) -> bool:
    return ".attn.fusion." in name or name.startswith("merge")
