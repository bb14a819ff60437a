"""Multi-scale features for the deformable transformer: a timm backbone and input projections.

``Backbone`` wraps any timm model that supports ``features_only`` (ResNets, ConvNeXts, Swin, ...)
and returns its last ``num_outs`` stages (strides 8, 16, 32 for a ResNet) in NCHW, with the padding
mask resized to each. ``InputProjection`` maps them to ``dim`` channels (1×1 conv + GroupNorm) and
adds extra levels by stride-2 3×3 convs on the last stage, Deformable-DETR's 4 levels from 3 stages.

As in Deformable-DETR's backbone, ``frozen_stages`` (1 in the paper recipes) keeps the stem and
the first stage at their pretrained values, and a CNN sees the batch padded only to its largest
image: other sizes give other feature maps, so extra padding would change the outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfx import hub
from dfx.errors import UsageError


class Backbone(nn.Module):
    """timm ``features_only`` backbone -> list of ([B, C_l, H_l, W_l], mask [B, H_l, W_l]).

    name: timm model name or dfx alias (``r50``); pretrained: a weight spec for ``dfx.hub``
    (``timm`` for timm's own weights, a path, ``hf://...``) or None; num_outs: last stages kept;
    frozen_bn: replace BatchNorm by frozen statistics (the usual choice with small per-GPU batches
    and pretrained weights); frozen_stages: 0 trains every stage, ``k`` freezes the stem and the
    first ``k - 1`` stages after it (timm's feature stages: 1 is the stem and ``layer1`` of a
    ResNet); kwargs: extra timm arguments (e.g. narrower ``channels``).
    """

    def __init__(self, name: str = "resnet50", pretrained: str | None = None, num_outs: int = 3,
                 frozen_bn: bool = False, kwargs: dict | None = None, frozen_stages: int = 0):
        super().__init__()
        kwargs = dict(kwargs or {})
        try:
            try:  # ViT-style backbones (Swin) must accept any input size; CNNs have no such argument
                probe = hub.create_timm_model(name, pretrained=None, features_only=True,
                                              **{"strict_img_size": False, **kwargs})
                kwargs.setdefault("strict_img_size", False)
            except TypeError:
                probe = hub.create_timm_model(name, pretrained=None, features_only=True, **kwargs)
        except (TypeError, RuntimeError, UsageError) as e:
            raise UsageError(f"model.backbone: timm cannot build {name!r} as a multi-scale feature extractor "
                             f"({str(e).splitlines()[0]}); use a CNN or Swin name such as resnet50") from None
        stages = len(probe.feature_info)
        # ViT-style models (they took strict_img_size) need whole patches and windows; CNNs need nothing
        self.pad_to_stride = "strict_img_size" in kwargs
        if num_outs > stages:
            raise UsageError(f"model.backbone: {name!r} has {stages} feature stages, fewer than the {num_outs} needed")
        out_indices = tuple(range(stages - num_outs, stages))
        del probe
        self.body = hub.create_timm_model(name, pretrained=pretrained, features_only=True, out_indices=out_indices,
                                          **kwargs)
        if frozen_bn:
            from timm.layers import freeze_batch_norm_2d

            self.body = freeze_batch_norm_2d(self.body)
        self.channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self._freeze(frozen_stages)

    def _freeze(self, frozen_stages: int) -> None:
        """Stop the gradients of every module up to the end of feature stage ``frozen_stages``."""
        if frozen_stages <= 0:
            return
        info = self.body.feature_info.info
        if frozen_stages > len(info):
            raise UsageError(f"model.backbone_frozen_stages: {frozen_stages} exceeds the {len(info)} stages of "
                             "the backbone")
        last = info[frozen_stages]["module"].replace(".", "_")  # a stage is the module after the stem
        for name, child in self.body.named_children():
            child.requires_grad_(False)
            if name == last:
                break

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """images [B, 3, H, W], mask [B, H, W] (True = padding) -> (per stage (map, mask), input mask as padded).

        A ViT-style backbone (Swin) gets the batch padded (bottom, right) to a multiple of its
        largest stride, so every stage sees whole windows and patches; a CNN gets it as it is.
        """
        stride = max(self.strides) if self.pad_to_stride else 1
        pad_h, pad_w = -images.shape[-2] % stride, -images.shape[-1] % stride
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)
        outs = []
        for feature in self.body(images):
            if self.channels_last:
                feature = feature.permute(0, 3, 1, 2)
            level_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:])[0].bool()
            outs.append((feature, level_mask))
        return outs, mask


def _group_norm(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, dim), dim)


class InputProjection(nn.Module):
    """Backbone stages -> ``levels`` maps of ``dim`` channels (extra levels from the last stage)."""

    def __init__(self, in_channels: list[int], dim: int, levels: int):
        super().__init__()
        if levels < len(in_channels):
            raise UsageError(f"model.levels: {levels} is fewer than the backbone stages used ({len(in_channels)})")
        layers = [nn.Sequential(nn.Conv2d(c, dim, 1), _group_norm(dim)) for c in in_channels]
        source = in_channels[-1]
        for _ in range(levels - len(in_channels)):
            layers.append(nn.Sequential(nn.Conv2d(source, dim, 3, stride=2, padding=1), _group_norm(dim)))
            source = dim
        self.layers = nn.ModuleList(layers)
        self.num_stages = len(in_channels)
        for layer in self.layers:
            nn.init.xavier_uniform_(layer[0].weight, gain=1)
            nn.init.zeros_(layer[0].bias)

    def forward(self, features: list[tuple[Tensor, Tensor]], mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """features: the backbone's (map, mask) pairs; mask [B, H, W] the input's padding (True),
        resized to each extra level as the reference does (not taken from the previous level)."""
        maps, masks = [], []
        for layer, (feature, mask) in zip(self.layers, features):
            maps.append(layer(feature))
            masks.append(mask)
        last = features[-1][0]
        for layer in self.layers[self.num_stages:]:
            last = layer(last)
            maps.append(last)
            masks.append(F.interpolate(mask[None].float(), size=last.shape[-2:])[0].bool())
        return maps, masks
