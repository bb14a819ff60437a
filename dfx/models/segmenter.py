"""Segmenter: a plain ViT with a linear decoder (the segmentation task's model)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Segmenter(nn.Module):
    """A ViT backbone and a linear decoder (Segmenter's linear baseline).

    images [B, 3, H, W] -> backbone.forward_features -> patch tokens [B, h*w, C] (prefix tokens
    dropped) -> Linear(C, K) -> logits on the token grid [B, K, h, w] -> bilinear upsampling ->
    [B, K, H, W]. The dense features are the backbone's final normed patch tokens, so wrapping the
    backbone with ``dfx.cluster.hourglass`` clusters and reconstructs exactly what the decoder reads.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def dense_features(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens [B, h*w, C] and the token grid (h, w)."""
        grid = tuple(self.backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        tokens = self.backbone.forward_features(images)
        return tokens[:, self.backbone.num_prefix_tokens:], grid

    def forward(self, images: Tensor) -> Tensor:
        patches, grid = self.dense_features(images)
        logits = self.head(patches).transpose(1, 2).unflatten(2, grid)  # [B, K, h, w]
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
