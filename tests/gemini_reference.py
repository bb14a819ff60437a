"""An independent re-statement of GeminiFusion's reference models, for tests.

It rebuilds the module structure of the reference code (JiaDingCN/GeminiFusion: the NYUDv2 / SUN
RGB-D segmenter and the DeLiVER model) so that its ``state_dict()`` has the released files' keys
and shapes, and computes the way the reference does: modalities as Python lists, shared layers
wrapped in a ``.module``, the fusion with ``nn.MultiheadAttention`` over two candidates token by
token, the extra modalities scored on the token map and merged by an element-wise maximum, the
streams detached inside the ensemble. dfx's vectorised model must give the same logits with
the same weights. Written for tests only: no training, no pretrained loading.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MIT_SIZES = {"b2": ([64, 128, 320, 512], [3, 4, 6, 3]), "b3": ([64, 128, 320, 512], [3, 4, 18, 3])}
HEADS = [1, 2, 5, 8]
SR_RATIOS = [8, 4, 2, 1]


class Wrapped(nn.Module):
    """One layer shared by every modality: applied to each element of a list (``<name>.module.*``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, xs):
        return [self.module(x) for x in xs]


class NormPerModality(nn.Module):
    """``ln_0``, ``ln_1``, ...: modality ``i`` of the list goes through ``ln_i``."""

    def __init__(self, dim: int, count: int = 2):
        super().__init__()
        for i in range(count):
            setattr(self, f"ln_{i}", nn.LayerNorm(dim, eps=1e-6))

    def forward(self, xs):
        return [getattr(self, f"ln_{i}")(x) for i, x in enumerate(xs)]


class RelationMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, cross_heads: int = 8):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr_ratio
        self.q = Wrapped(nn.Linear(dim, dim))
        self.kv = Wrapped(nn.Linear(dim, 2 * dim))
        self.proj = Wrapped(nn.Linear(dim, dim))
        if sr_ratio > 1:
            self.sr = Wrapped(nn.Conv2d(dim, dim, sr_ratio, sr_ratio))
            self.norm = NormPerModality(dim)
        self.cross_attn_0_to_1 = nn.MultiheadAttention(dim, cross_heads)
        self.cross_attn_1_to_0 = nn.MultiheadAttention(dim, cross_heads)
        self.relation_judger = nn.Sequential(RelationMlp(dim), nn.Softmax(dim=-1))
        self.k_noise = nn.Embedding(2, dim)
        self.v_noise = nn.Embedding(2, dim)

    def self_attention(self, xs, h, w):
        batch, tokens, dim = xs[0].shape
        split = lambda t: t.reshape(batch, -1, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        queries = [split(q) for q in self.q(xs)]
        sources = xs
        if self.sr_ratio > 1:
            maps = self.sr([x.transpose(1, 2).reshape(batch, dim, h, w) for x in xs])
            sources = self.norm([m.flatten(2).transpose(1, 2) for m in maps])
        out = []
        for q, kv in zip(queries, self.kv(sources)):
            k, v = split(kv[..., :dim]), split(kv[..., dim:])
            weights = (q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5).softmax(-1)
            out.append((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))
        return out

    def gemini(self, own, other, direction, attention):
        """Every token attends over [own + k_noise, own * relation] with values [own + v_noise, other]."""
        updated = []
        for b in range(own.shape[0]):  # the reference loops over the batch
            query = own[b:b + 1]  # [1 (target length), N (batch of tokens), C]
            relation = self.relation_judger(torch.cat([own[b:b + 1], other[b:b + 1]], -1))
            keys = torch.cat([self.k_noise.weight[direction] + query, query * relation])  # [2, N, C]
            values = torch.cat([self.v_noise.weight[direction] + query, other[b:b + 1]])
            updated.append(own[b] + attention(query, keys, values)[0][0])
        return torch.stack(updated)

    def forward(self, xs, h, w):
        x0, x1 = self.self_attention(xs, h, w)
        fused = [self.gemini(x0, x1, 0, self.cross_attn_0_to_1), self.gemini(x1, x0, 1, self.cross_attn_1_to_0)]
        return self.proj(fused)


class DepthwiseConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        batch, _, dim = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(batch, dim, h, w)).flatten(2).transpose(1, 2)


class MixMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Wrapped(nn.Linear(dim, hidden))
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = Wrapped(nn.Linear(hidden, dim))

    def forward(self, xs, h, w):
        return self.fc2([F.gelu(self.dwconv(x, h, w)) for x in self.fc1(xs)])


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.norm1 = NormPerModality(dim)
        self.attn = Attention(dim, heads, sr_ratio)
        self.norm2 = NormPerModality(dim)
        self.mlp = MixMlp(dim, 4 * dim)

    def forward(self, xs, h, w):
        xs = [x + f for x, f in zip(xs, self.attn(self.norm1(xs), h, w))]
        return [x + f for x, f in zip(xs, self.mlp(self.norm2(xs), h, w))]


class PatchEmbed(nn.Module):
    def __init__(self, kernel: int, stride: int, in_chans: int, dim: int, inputs: int):
        super().__init__()
        self.proj = Wrapped(nn.Conv2d(in_chans, dim, kernel, stride, kernel // 2))
        self.norm = NormPerModality(dim, inputs)

    def forward(self, xs):
        maps = self.proj(xs)
        h, w = maps[0].shape[2:]
        return self.norm([m.flatten(2).transpose(1, 2) for m in maps]), h, w


class ScorePredictor(nn.Module):
    """One conv scorer per modality (the reference builds as many as modalities, uses one fewer)."""

    def __init__(self, dim: int, modalities: int):
        super().__init__()
        self.score_nets = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.Conv2d(dim, 1, 1), nn.Sigmoid())
            for _ in range(modalities))

    def forward(self, extras, h, w):
        batch, tokens, dim = extras[0].shape
        return [net(x.transpose(1, 2).reshape(batch, dim, h, w)).flatten(2).transpose(1, 2)
                for net, x in zip(self.score_nets, extras)]


class MiT(nn.Module):
    """The multi-modal MiT: 2 streams through the blocks; more inputs merged into stream 1 per stage."""

    def __init__(self, embed_dims, depths, inputs: int = 2):
        super().__init__()
        self.inputs = inputs
        previous = 3
        for i, (dim, depth) in enumerate(zip(embed_dims, depths), 1):
            setattr(self, f"patch_embed{i}", PatchEmbed(7 if i == 1 else 3, 4 if i == 1 else 2, previous, dim, inputs))
            setattr(self, f"block{i}", nn.ModuleList(Block(dim, HEADS[i - 1], SR_RATIOS[i - 1]) for _ in range(depth)))
            setattr(self, f"norm{i}", NormPerModality(dim))
            previous = dim
        if inputs > 2:
            self.extra_score_predictor = nn.ModuleList(ScorePredictor(d, inputs) for d in embed_dims)

    def forward(self, xs):
        batch = xs[0].shape[0]
        outs = ([], [])
        for i in range(1, 5):
            xs, h, w = getattr(self, f"patch_embed{i}")(xs)
            if self.inputs > 2:
                extras = xs[1:]
                scores = self.extra_score_predictor[i - 1](extras, h, w)
                extras = [s * x + x for s, x in zip(scores, extras)]
                merged = extras[0]
                for x in extras[1:]:
                    merged = torch.max(merged, x)
                xs = [xs[0], merged]
            for block in getattr(self, f"block{i}"):
                xs = block(xs, h, w)
            xs = [x.reshape(batch, h, w, -1).permute(0, 3, 1, 2) for x in getattr(self, f"norm{i}")(xs)]
            outs[0].append(xs[0])
            outs[1].append(xs[1])
            if self.inputs > 2:
                xs = [xs[0]] + [x.reshape(batch, h, w, -1).permute(0, 3, 1, 2) + xs[1] for x in extras]
        return outs


class Projection(nn.Module):
    def __init__(self, dim: int, embed: int):
        super().__init__()
        self.proj = nn.Linear(dim, embed)

    def forward(self, x):
        batch, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(batch, -1, h, w)


class FuseConv(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Head(nn.Module):
    def __init__(self, dims, embed: int, classes: int):
        super().__init__()
        for i, dim in enumerate(dims, 1):
            setattr(self, f"linear_c{i}", Projection(dim, embed))
        self.linear_fuse = FuseConv(4 * embed, embed)
        self.linear_pred = nn.Conv2d(embed, classes, 1)

    def forward(self, features):
        size = features[0].shape[2:]
        maps = [F.interpolate(getattr(self, f"linear_c{i}")(f), size=size, mode="bilinear", align_corners=False)
                for i, f in enumerate(features, 1)]
        return self.linear_pred(self.linear_fuse(torch.cat(maps[::-1], 1)))


def ensemble(alpha, streams):
    weights = alpha.softmax(0)
    return sum(w * s.detach() for w, s in zip(weights, streams))


class NyuSegmenter(nn.Module):
    """The NYUDv2 / SUN RGB-D model: ``encoder``, ``decoder`` (256 wide), ``alpha``; logits at stride 4."""

    def __init__(self, embed_dims, depths, classes: int, decoder_dim: int = 256):
        super().__init__()
        self.encoder = MiT(embed_dims, depths)
        self.decoder = Head(embed_dims, decoder_dim, classes)
        self.alpha = nn.Parameter(torch.ones(2))

    def forward(self, xs):
        streams = [self.decoder(f) for f in self.encoder(xs)]
        return [*streams, ensemble(self.alpha, streams)]


class DeliverSegmenter(nn.Module):
    """The DeLiVER model: ``backbone``, ``decode_head`` (512 wide), ``alpha``; logits at input size."""

    def __init__(self, embed_dims, depths, classes: int, modalities: int = 4, decoder_dim: int = 512):
        super().__init__()
        self.backbone = MiT(embed_dims, depths, modalities)
        self.decode_head = Head(embed_dims, decoder_dim, classes)
        self.alpha = nn.Parameter(torch.ones(2))

    def forward(self, xs):
        streams = [F.interpolate(self.decode_head(f), size=xs[0].shape[2:], mode="bilinear", align_corners=False)
                   for f in self.backbone(xs)]
        return [*streams, ensemble(self.alpha, streams)]


def seed_values(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every tensor with seeded values of a trained model's scale (norms near 1, variances > 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif (".ln_" in name or "norm" in name or ".bn." in name) and name.endswith("weight"):
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_(0.1 * noise)
    return model


def nyudv2_release(model: NyuSegmenter) -> dict:
    """The NYUDv2 / SUN file layout: DistributedDataParallel keys under ``segmenter``, numpy scalars beside."""
    return {"segmenter": {f"module.{k}": v for k, v in model.state_dict().items()},
            "epoch_start": 300, "best_val": np.float64(56.8), "best_epoch": np.int64(287)}


def deliver_release(model: DeliverSegmenter) -> dict:
    """The DeLiVER file layout: the bare state dict."""
    return dict(model.state_dict())
