"""MaskDINO's mask branch: every query becomes a mask through a dot product with a per-pixel embedding.

Shapes: ``B`` images, ``Q`` queries, ``C`` width (the detector's ``dim``, also MaskDINO's mask
dimension), ``H4 × W4`` the stride-4 map, ``H8 × W8`` the stride-8 (finest encoder) level.

The per-pixel embedding (MaskDINO's pixel decoder, after its deformable encoder)::

    y             = lateral(stage 4) + upsample_bilinear(encoder output at 1/8, to H4 × W4)
    y             = ReLU(GN(conv3x3(y)))                     (output conv)
    mask_features = conv1x1(y)                               [B, C, H4, W4]

with ``lateral`` a 1×1 conv + GroupNorm of the backbone's stride-4 stage. A query's mask is

    mask_embed = MLP(3)(normed query)                        [B, Q, C]
    masks      = einsum("bqc,bchw->bqhw", mask_embed, mask_features)   [B, Q, H4, W4] logits

computed for every decoder layer and for the initial (selected) queries. The detector switches the
branch on with ``DetectorConfig.masks``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfx.detection.backbone import _group_norm
from dfx.detection.transformer import MLP


def _kaiming_fill(conv: nn.Conv2d) -> nn.Conv2d:
    """detectron2's ``c2_xavier_fill`` (the reference's initialisation of these convs): kaiming
    uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class MaskHead(nn.Module):
    """Per-pixel embedding and per-query mask embedding (module docstring).

    stage_channels: channels of the backbone's stride-4 stage; dim: the transformer width.
    """

    def __init__(self, stage_channels: int, dim: int):
        super().__init__()
        # GroupNorm follows the convs, so they carry no bias (as in the reference)
        self.lateral = nn.Sequential(_kaiming_fill(nn.Conv2d(stage_channels, dim, 1, bias=False)), _group_norm(dim))
        self.output = nn.Sequential(_kaiming_fill(nn.Conv2d(dim, dim, 3, padding=1, bias=False)), _group_norm(dim),
                                    nn.ReLU(inplace=True))
        self.mask_features = _kaiming_fill(nn.Conv2d(dim, dim, 1))
        self.mask_embed = MLP(dim, dim, dim, 3)

    def pixel_embedding(self, stage4: Tensor, encoded8: Tensor) -> Tensor:
        """stage4 [B, C4, H4, W4] backbone features, encoded8 [B, C, H8, W8] the encoder's finest
        level -> mask_features [B, C, H4, W4]."""
        lateral = self.lateral(stage4)
        upsampled = F.interpolate(encoded8, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.output(lateral + upsampled))

    def forward(self, queries: Tensor, mask_features: Tensor) -> Tensor:
        """queries [B, Q, C] (already normed), mask_features [B, C, H4, W4] -> mask logits [B, Q, H4, W4]."""
        return torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), mask_features)


@torch.no_grad()
def instance_masks(pred_masks: Tensor, queries: list[Tensor], sizes: Tensor, orig_sizes: Tensor
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """The kept queries' masks on their original images, as MaskDINO's instance inference makes them.

    pred_masks [B, Q, h, w] logits on the padded batch's stride-4 grid; queries: per image the kept
    query indices [D_i] (``postprocess``'s ``queries``); sizes [B, 2] (h, w) of each image as the model
    saw it (unpadded), orig_sizes [B, 2] as read. Each mask is upsampled bilinearly to the padded
    input (4x), cut to its image, resized to the original size and thresholded at logit 0. Returns
    per image (masks bool [D_i, H_i, W_i], mask scores [D_i]: the mean probability inside the mask,
    which MaskDINO multiplies into the class score).
    """
    padded = (pred_masks.shape[-2] * 4, pred_masks.shape[-1] * 4)
    masks, scores = [], []
    for logits, kept, size, orig in zip(pred_masks, queries, sizes.tolist(), orig_sizes.tolist()):
        image = F.interpolate(logits[kept][None].float(), size=padded, mode="bilinear", align_corners=False)
        image = image[..., : size[0], : size[1]]
        image = F.interpolate(image, size=orig, mode="bilinear", align_corners=False)[0]
        binary = image > 0
        masks.append(binary)
        scores.append((image.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6))
    return masks, scores


@torch.no_grad()
def mask_boxes(masks: Tensor, padding: Tensor, exclusive: bool = False) -> Tensor:
    """Boxes [B, Q, 4] (cxcywh, relative to each unpadded image) around the pixels of mask logits
    [B, Q, h, w] > 0 on the padded batch's stride-4 grid; padding [B, 4h, 4w] True outside the image.

    The right/bottom edge is the last pixel's index (torchvision ``masks_to_boxes``, MaskDINO's
    ``mask2box``) or one past it with ``exclusive`` (detectron2 ``BitMasks``, MaskDINO's ``bitmask``).
    An empty mask gives a degenerate box, as the reference's conversion does (torchvision's fails).
    """
    from torchvision.ops import box_convert

    inside = masks > 0
    height, width = inside.shape[-2:]
    ys = torch.arange(height, device=masks.device, dtype=masks.dtype)[:, None].expand(height, width)
    xs = torch.arange(width, device=masks.device, dtype=masks.dtype)[None].expand(height, width)
    big = torch.finfo(masks.dtype).max
    x0 = xs.masked_fill(~inside, big).flatten(2).min(-1).values
    y0 = ys.masked_fill(~inside, big).flatten(2).min(-1).values
    past = float(exclusive)  # a float, not a bool: an ONNX trace has no tensor + bool
    x1 = (xs * inside).flatten(2).max(-1).values + past
    y1 = (ys * inside).flatten(2).max(-1).values + past
    valid = ~padding  # the image's size in stride-4 cells
    size = torch.stack((valid[:, 0].sum(-1), valid[:, :, 0].sum(-1)), -1).to(masks.dtype) / 4
    boxes = box_convert(torch.stack((x0, y0, x1, y1), -1), "xyxy", "cxcywh")
    return boxes / torch.cat((size, size), -1)[:, None]
