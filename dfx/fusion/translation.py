"""Multi-modal image-to-image translation: TokenFusion's generator on dfx's multi-modal MiT.

TokenFusion (and GeminiFusion after it) translate M aligned inputs (e.g. Taskonomy reshading +
edge texture) into an image with a transformer generator: a MiT encoder whose blocks fuse the
modalities, a decoder of transformer blocks that climbs back one stride at a time, each step a
PixelShuffle(2) followed by a 1x1 conv (the reference's ``PatchUpsample``) plus the encoder's map of
that stride as a skip, and a 1x1 conv to RGB under ``tanh``. Every stream decodes its own image
(the decoder's weights are shared, its LayerNorms per stream, as in the encoder) and a learned
ensemble ``sum_s softmax(alpha)_s * image_s`` (images detached, as in the reference) gives the
fused output.

dfx's generator keeps SegFormer's four-stage MiT (strides 4-32, so ``mit_b*`` ImageNet weights
load) where the reference has five stride-2 stages of its own widths; the decoder therefore runs
three block stages (strides 16, 8, 4, widths of encoder stages 3, 2, 1) and two PixelShuffle steps
to full resolution. The fusion strategy is the encoder's (dfx.fusion.strategies: none, concat,
exchange, cross-attn, gemini); the decoder blocks do not fuse, as in the reference.

The conditional discriminator (:class:`PatchDiscriminator`) judges ``[input, image]`` pairs (6
channels) with a one-stream MiT and a 1x1 conv to one logit per stride-32 patch (the reference's
discriminator is its MiT encoder with a sigmoid head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfx.fusion.mit import Block, ModalityLayerNorm, MultiModalMiT, _init_weights


class PixelShuffleUp(nn.Module):
    """``[R, C_in, h, w] -> [R, C_out, 2h, 2w]``: PixelShuffle(2) then a 1x1 conv (C_in must divide by 4)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim % 4:
            raise ValueError(f"PixelShuffle(2) needs a width divisible by 4, got {in_dim}")
        self.shuffle = nn.PixelShuffle(2)
        self.proj = nn.Conv2d(in_dim // 4, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.shuffle(x))


class TranslationGenerator(nn.Module):
    """Multi-modal MiT encoder + PixelShuffle decoder with skips + per-stream images + ensemble.

    ``forward(images [B, M, 3, H, W])`` -> the ensemble image ``[B, out_chans, H, W]`` in [-1, 1];
    ``forward(images, streams=True)`` (or a list of per-modality ``[B, 3, H, W]`` tensors) ->
    ``{"streams": [S x [B, out_chans, H, W]], "ensemble": [B, out_chans, H, W]}``. With one stream
    the ensemble is that stream's image (not detached). ``decoder_depths``: blocks at strides 16,
    8, 4 (default: the encoder's stages 3, 2, 1).
    """

    def __init__(self, backbone: MultiModalMiT, out_chans: int = 3, decoder_depths: list[int] | None = None):
        super().__init__()
        self.backbone = backbone
        dims, streams = backbone.embed_dims, backbone.streams
        stages = [getattr(backbone, f"block{i}") for i in range(1, 5)]
        depths = list(decoder_depths) if decoder_depths is not None else [len(stages[i]) for i in (2, 1, 0)]
        if len(depths) != 3 or min(depths) < 0:
            raise ValueError(f"decoder_depths: expected three block counts (strides 16, 8, 4), got {depths}")
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.norms = nn.ModuleList()
        for level, depth in zip((2, 1, 0), depths):  # encoder stage index of the skip
            template = stages[level][0]
            heads, sr = template.attn.heads, template.attn.sr_ratio
            ratio = template.mlp.fc1.out_features / dims[level]
            self.up.append(PixelShuffleUp(dims[level + 1], dims[level]))
            self.blocks.append(nn.ModuleList(Block(dims[level], heads, ratio, sr, 0.0, streams, None)
                                             for _ in range(depth)))
            self.norms.append(ModalityLayerNorm(dims[level], streams))
        self.to_full = nn.Sequential(PixelShuffleUp(dims[0], dims[0]), PixelShuffleUp(dims[0], dims[0]))
        self.project = nn.Conv2d(dims[0], out_chans, 1)
        self.alpha = nn.Parameter(torch.ones(streams))
        for module in (self.up, self.blocks, self.norms, self.to_full, self.project):
            module.apply(_init_weights)

    @property
    def streams(self) -> int:
        return self.backbone.streams

    def forward_all(self, images: torch.Tensor) -> dict:
        features = self.backbone(images)  # 4 x [S, B, C, h, w]
        streams, batch = features[0].shape[:2]
        x = features[3].flatten(0, 1)
        for up, blocks, norm, level in zip(self.up, self.blocks, self.norms, (2, 1, 0)):
            skip = features[level].flatten(0, 1)
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # inputs not divisible by 32: align on the skip's grid
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = x + skip
            grid = tuple(x.shape[-2:])
            tokens = x.flatten(2).transpose(1, 2)
            for block in blocks:
                tokens = block(tokens, grid)
            x = norm(tokens).transpose(1, 2).reshape(x.shape)
        x = self.to_full(x)
        if x.shape[-2:] != images.shape[-2:]:
            x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.tanh(self.project(x))
        per_stream = list(out.unflatten(0, (streams, batch)).unbind(0))
        if streams == 1:
            return {"streams": per_stream, "ensemble": per_stream[0]}
        weights = self.alpha.softmax(0)
        ensemble = sum(w * image.detach() for w, image in zip(weights, per_stream))
        return {"streams": per_stream, "ensemble": ensemble}

    def forward(self, images, streams: bool = False):
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


class PatchDiscriminator(nn.Module):
    """Conditional discriminator: ``forward(condition [R, 3, H, W], image [R, 3, H, W])`` -> logits
    ``[R, 1, H/32, W/32]`` (one per stride-32 patch; a sigmoid of them is the reference's output)."""

    def __init__(self, variant: str = "b0", in_chans: int = 6, **sizes):
        super().__init__()
        self.encoder = MultiModalMiT(variant, 1, "none", in_chans=in_chans, **sizes)
        self.head = nn.Conv2d(self.encoder.embed_dims[-1], 1, 1)
        _init_weights(self.head)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(torch.cat([condition, image], 1)[:, None])[-1][0])


class Translator(nn.Module):
    """The generator and, when trained adversarially, the discriminator (kept for training only).

    ``forward`` is the generator's: a ``[B, M, 3, H, W]`` tensor -> the ensemble image, ``streams=True``
    or a list of per-modality tensors -> the dict of :meth:`TranslationGenerator.forward_all`.
    """

    def __init__(self, generator: TranslationGenerator, discriminator: PatchDiscriminator | None = None):
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator

    @property
    def backbone(self) -> MultiModalMiT:
        return self.generator.backbone

    def forward(self, images, streams: bool = False):
        return self.generator(images, streams=streams)

    def sparsity_loss(self):
        return self.generator.sparsity_loss()
