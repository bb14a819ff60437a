"""SegFormer all-MLP decoder and the multi-modal segmenter (per-stream logits + learned ensemble)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfx.fusion.mit import MultiModalMiT


class LinearProjection(nn.Module):
    """``[B, C, h, w] -> [B, E, h, w]``: a Linear over channels (SegFormer's ``linear_c<i>.proj``)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, x.shape[2:])


class ConvBNReLU(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """All-MLP decoder: four feature maps (strides 4..32) -> logits at stride 4.

    Each map ``[B, C_i, h_i, w_i]`` is projected to ``embed_dim`` channels and upsampled
    (bilinear) to the stride-4 grid; the four are concatenated (deepest first), fused by a 1x1
    conv + BN + ReLU, dropped out and classified by a 1x1 conv: ``[B, K, H/4, W/4]``.
    """

    def __init__(self, in_dims: list[int], embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        for i, dim in enumerate(in_dims, 1):
            self.add_module(f"linear_c{i}", LinearProjection(dim, embed_dim))
        self.linear_fuse = ConvBNReLU(len(in_dims) * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        maps = [F.interpolate(getattr(self, f"linear_c{i}")(x), size=size, mode="bilinear", align_corners=False)
                for i, x in enumerate(features, 1)]
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(maps[::-1], 1))))


class FusionSegmenter(nn.Module):
    """Multi-modal MiT + one SegFormer head shared by the streams + a learned ensemble.

    ``forward_all(images [B, M, 3, H, W])`` -> ``{"streams": [S x [B, K, H, W]], "ensemble": [B, K, H, W]}``
    at the input resolution (bilinear), where the ensemble is
    ``sum_s softmax(ensemble_weights)_s * logits_s`` (``ensemble_weights`` starts at zero: equal
    weights). With ``detach_ensemble`` (GeminiFusion's reference) the streams' logits are detached
    inside the ensemble, so a loss on the ensemble trains the ensemble weights only and each stream
    learns from its own loss; with one stream the ensemble is that stream, never detached.

    ``forward(images)`` with a ``[B, M, 3, H, W]`` tensor returns the ensemble logits, so
    segmentation evaluators can call the model like a single-modality one; ``forward(images,
    streams=True)`` returns the dict (through DistributedDataParallel too); ``forward([x_0, ...,
    x_{M-1}])``, one ``[B, 3, H, W]`` tensor per modality (dfx.create_model's contract), returns
    the dict.
    """

    def __init__(self, backbone: MultiModalMiT, num_classes: int, embed_dim: int = 256, dropout: float = 0.1,
                 detach_ensemble: bool = True):
        super().__init__()
        self.backbone = backbone
        self.decode_head = SegFormerHead(backbone.embed_dims, embed_dim, num_classes, dropout)
        self.ensemble_weights = nn.Parameter(torch.zeros(backbone.streams))
        self.detach_ensemble = detach_ensemble

    @property
    def streams(self) -> int:
        return self.backbone.streams

    def forward_all(self, images: torch.Tensor) -> dict:
        features = self.backbone(images)  # 4 x [S, B, C, h, w]
        streams, batch = features[0].shape[:2]
        logits = self.decode_head([f.flatten(0, 1) for f in features])
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        per_stream = list(logits.unflatten(0, (streams, batch)).unbind(0))
        detach = self.detach_ensemble and streams > 1
        weights = self.ensemble_weights.softmax(0)
        ensemble = sum(w * (x.detach() if detach else x) for w, x in zip(weights, per_stream))
        return {"streams": per_stream, "ensemble": ensemble}

    def forward(self, images, streams: bool = False):
        """Ensemble logits ``[B, K, H, W]``; the dict of :meth:`forward_all` with ``streams=True`` or
        when ``images`` is a list of per-modality ``[B, 3, H, W]`` tensors."""
        if isinstance(images, (list, tuple)):
            if len(images) != self.backbone.modalities:
                raise ValueError(f"expected {self.backbone.modalities} images (one [B, 3, H, W] tensor per modality), "
                                 f"got {len(images)}")
            return self.forward_all(torch.stack(list(images), 1))
        out = self.forward_all(images)
        return out if streams else out["ensemble"]

    def sparsity_loss(self) -> torch.Tensor | None:
        """Mean token-exchange score of the last forward over blocks (``exchange`` only), else None."""
        terms = [m.sparsity for m in self.backbone.fusion_modules() if getattr(m, "sparsity", None) is not None]
        return torch.stack(terms).mean() if terms else None
