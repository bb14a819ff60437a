"""DPT (Ranftl et al., "Vision Transformers for Dense Prediction", 2021): a dense head over four
tapped blocks of a timm ViT, for depth.

images [B, 3, H, W] -> the ViT, tapped after four blocks (``hooks``) -> **reassemble**: each tap's
patch tokens [B, h*w, C] combined with the class token (readout ``project``: concat, Linear(2C, C),
GELU), laid out on the token grid [B, C, h, w], a 1x1 conv to ``reassemble[i]`` channels and a
resampling to strides 4, 8, 16, 32 (ConvTranspose x4, ConvTranspose x2, identity, 3x3 conv stride
2; with 16-pixel patches) -> a 3x3 conv to ``features`` channels each -> **fusion**: from the
coarsest map up, ``FusionBlock(deeper, skip)`` adds a residual unit of the skip, refines, doubles
the resolution and projects (1x1) -> **head**: 3x3 conv to features/2, x2 bilinear, 3x3 conv to 32,
ReLU, 1x1 conv to one channel -> [B, 1, H, W].

The hybrid ViT (``vit_base_r50_s16_384``: a ResNet-50 stem and stages before a ViT-B/16 on its
stride-16 features) is tapped as DPT-Hybrid is: the first two taps are the ResNet's stages 0 and 1
(stride 4 and 8, read by forward hooks, no reassembly), the last two are ViT blocks.

What the one channel means is the ``output``: ``metric`` depth in metres, ``max_depth *
sigmoid(x)``; ``inverse`` depth in metres as DPT's fine-tuned NYUv2 / KITTI models give it,
``1 / (inverse_scale * relu(x) + inverse_shift)`` (their fixed scale and shift: the average
alignment of the relative model to the training set, 0.000305 / 0.1378 for NYUv2, 6.016e-5 /
0.00579 for KITTI); ``relative`` inverse depth up to scale and shift, ``relu(x)`` (DPT's
non-negative head; the metrics align it to the ground truth per image, dfx.data.depth_eval).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The paper's taps and reassembly widths per backbone (isl-org/DPT, dpt/vit.py); for the hybrid the
# first two taps index the ResNet's stages.
PAPER_CONFIGS = {
    "vit_base_patch16_384": {"hooks": [2, 5, 8, 11], "reassemble": [96, 192, 384, 768]},
    "vit_large_patch16_384": {"hooks": [5, 11, 17, 23], "reassemble": [256, 512, 1024, 1024]},
    "vit_base_r50_s16_384": {"hooks": [0, 1, 8, 11], "reassemble": [256, 512, 768, 768]},
}
OUTPUTS = ("metric", "inverse", "relative")
KEPT = "dpt_output"  # where a tapped CNN stage's forward hook leaves its output, until taps() takes it


def _keep_output(module: nn.Module, inputs, output: Tensor) -> None:
    # the output is kept on the stage itself, not on the DPT, so a deep copy (EMA) taps its own stages
    module.__dict__[KEPT] = output


def is_hybrid(backbone: nn.Module) -> bool:
    """A timm ViT whose patch embedding runs a CNN first (HybridEmbed)."""
    return hasattr(backbone.patch_embed, "backbone")


def default_hooks(depth: int, hybrid: bool) -> list[int]:
    """Four taps spread over ``depth`` blocks (quarter points); a hybrid's first two are its CNN stages."""
    quarters = [max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)]
    return [0, 1, *quarters[2:]] if hybrid else quarters


def default_reassemble(width: int) -> list[int]:
    """Reassembly widths C/8, C/4, C/2, C (ViT-B/16's 96, 192, 384, 768)."""
    return [max(8, width // 8), max(8, width // 4), max(8, width // 2), width]


class ProjectReadout(nn.Module):
    """Patch tokens [B, N, C] and class token [B, 1, C] -> Linear(2C, C) + GELU of their concat -> [B, N, C]."""

    def __init__(self, width: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, patches: Tensor, readout: Tensor) -> Tensor:
        return self.project(torch.cat([patches, readout.expand_as(patches)], dim=-1))


def resample(channels: int, factor: float) -> nn.Module:
    """Token grid -> stride 4/8/16/32: transposed conv x4 or x2, identity, or a stride-2 3x3 conv."""
    if factor >= 2:
        k = int(factor)
        return nn.ConvTranspose2d(channels, channels, kernel_size=k, stride=k)
    if factor == 1:
        return nn.Identity()
    return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)


class Reassemble(nn.Module):
    """One ViT tap -> an image-like map: readout, token grid, 1x1 conv to ``channels``, resampling."""

    def __init__(self, width: int, channels: int, factor: float):
        super().__init__()
        self.readout = ProjectReadout(width)
        self.project = nn.Conv2d(width, channels, kernel_size=1)
        self.resample = resample(channels, factor)

    def forward(self, grid: Tensor, readout: Tensor) -> Tensor:
        """grid [B, C, h, w] (tokens on their grid), readout [B, 1, C] -> [B, channels, h*f, w*f]."""
        b, c, h, w = grid.shape
        tokens = self.readout(grid.flatten(2).transpose(1, 2), readout)
        return self.resample(self.project(tokens.transpose(1, 2).reshape(b, c, h, w)))


class ResidualConvUnit(nn.Module):
    """x + conv3x3(relu(conv3x3(relu(x))))."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """deeper [B, F, h, w] (+ residual unit of skip [B, F, h, w]) -> residual unit -> resize -> 1x1 conv.

    The result has the size of the next (finer) skip, ``size``, or twice ``h, w`` (bilinear,
    align_corners=True as in DPT).
    """

    def __init__(self, features: int):
        super().__init__()
        self.skip_unit = ResidualConvUnit(features)
        self.unit = ResidualConvUnit(features)
        self.project = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, deeper: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        x = deeper if skip is None else deeper + self.skip_unit(skip)
        x = self.unit(x)
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.project(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class DepthHead(nn.Module):
    """features [B, F, h, w] -> [B, 1, 2h, 2w]: conv3x3 F/2, x2 bilinear, conv3x3 32, ReLU, conv1x1 1."""

    def __init__(self, features: int, hidden: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features // 2, hidden, kernel_size=3, padding=1)
        self.out = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(self.conv1(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out(F.relu(self.conv2(x)))


class DPT(nn.Module):
    """A DPT depth model over a timm VisionTransformer (plain or hybrid); see the module docstring.

    ``hooks``: four block indices (hybrid: two CNN stage indices, then two block indices);
    ``reassemble``: the four maps' widths; ``features``: the fusion width (256 in the paper);
    ``output``: ``metric`` (``max_depth * sigmoid``, metres), ``inverse`` (``1 / (inverse_scale *
    relu + inverse_shift)``, metres) or ``relative`` (ReLU, inverse depth).
    forward(images [B, 3, H, W]) -> [B, 1, H, W].
    """

    def __init__(self, backbone: nn.Module, hooks: list[int], reassemble: list[int], features: int = 256,
                 output: str = "metric", max_depth: float = 10.0, inverse_scale: float = 0.000305,
                 inverse_shift: float = 0.1378):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if len(hooks) != 4 or len(reassemble) != 4:
            raise ValueError(f"DPT taps four blocks: got hooks {hooks} and reassemble widths {reassemble}")
        self.backbone = backbone
        self.hybrid = is_hybrid(backbone)
        self.output, self.max_depth = output, max_depth
        self.inverse_scale, self.inverse_shift = inverse_scale, inverse_shift
        width = backbone.embed_dim
        patch = backbone.patch_embed.patch_size[0] * (getattr(backbone.patch_embed, "feature_ratio", (1,))[0]
                                                     if self.hybrid else 1)
        self.patch = patch
        depth = len(backbone.blocks)
        vit_hooks = hooks[2:] if self.hybrid else hooks
        if any(not 0 <= h < depth for h in vit_hooks) or sorted(set(vit_hooks)) != list(vit_hooks):
            raise ValueError(f"hooks {hooks}: block indices must strictly increase and lie in [0, {depth}) "
                             f"({depth} blocks)")
        self.hooks = list(hooks)
        # strides 4, 8, 16, 32 from the token grid's stride (16 for ViT-B/16; other patch sizes scale along)
        factors = [patch / 4, patch / 8, 1.0, 0.5]
        if self.hybrid:
            cnn = backbone.patch_embed.backbone
            stages = [i for i in hooks[:2]]
            widths = [info["num_chs"] for info in cnn.feature_info if info["module"].startswith("stages.")]
            if any(not 0 <= s < len(widths) for s in stages):
                raise ValueError(f"hooks {hooks}: a hybrid's first two taps are CNN stages in [0, {len(widths)})")
            self.cnn_stages = stages
            for stage in stages:
                cnn.stages[stage].register_forward_hook(_keep_output)
            in_channels = [widths[s] for s in stages] + list(reassemble[2:])
            self.reassemble = nn.ModuleList([nn.Identity(), nn.Identity(),
                                             *(Reassemble(width, reassemble[i], factors[i]) for i in (2, 3))])
        else:
            in_channels = list(reassemble)
            self.reassemble = nn.ModuleList([Reassemble(width, reassemble[i], factors[i]) for i in range(4)])
        self.layer_rn = nn.ModuleList([nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False)
                                       for c in in_channels])
        self.fusion = nn.ModuleList([FusionBlock(features) for _ in range(4)])
        self.head = DepthHead(features)

    def taps(self, images: Tensor) -> list[Tensor]:
        """The four maps after reassembly, finest first: [B, reassemble[i], H/4, W/4] ... [B, ., H/32, W/32]."""
        vit_hooks = self.hooks[2:] if self.hybrid else self.hooks
        taps = self.backbone.forward_intermediates(images, indices=vit_hooks, return_prefix_tokens=True, norm=False,
                                                   output_fmt="NCHW", intermediates_only=True)
        maps = [module(grid, prefix[:, :1]) for module, (grid, prefix)
                in zip(self.reassemble[4 - len(taps):], taps)]
        if self.hybrid:
            stages = [self.backbone.patch_embed.backbone.stages[s] for s in self.cnn_stages]
            maps = [*(stage.__dict__.pop(KEPT) for stage in stages), *maps]
        return maps

    def forward_features(self, images: Tensor) -> Tensor:
        """The fused map at stride 2 [B, features, H/2, W/2]."""
        maps = [conv(m) for conv, m in zip(self.layer_rn, self.taps(images))]
        x = self.fusion[3](maps[3], size=maps[2].shape[-2:])
        x = self.fusion[2](x, maps[2], size=maps[1].shape[-2:])
        x = self.fusion[1](x, maps[1], size=maps[0].shape[-2:])
        return self.fusion[0](x, maps[0])

    def forward(self, images: Tensor) -> Tensor:
        raw = self.head(self.forward_features(images))
        if raw.shape[-2:] != images.shape[-2:]:  # patch sizes other than 16 end at another stride
            raw = F.interpolate(raw, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.output == "metric":
            return self.max_depth * torch.sigmoid(raw)
        if self.output == "inverse":
            return 1.0 / (self.inverse_scale * F.relu(raw) + self.inverse_shift).clamp(min=1e-8)
        return F.relu(raw)
