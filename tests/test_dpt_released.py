"""Released DPT checkpoints through model.weights: a state dict in the official layout (isl-org/DPT's
module names: pretrained.model / act_postprocess / scratch), built from a restatement of the reference
model, loads strictly into dfx's DPT and gives the restatement's outputs."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dfx.errors import UsageError
from dfx.models.dpt_released import convert_dpt, dfx_name
from dfx.recipe import build_recipe
from dfx.tasks.depth import Task
from dfx.weights import Checkpoint

VIT = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2}
HOOKS, WIDTHS, FEATURES = [0, 1, 2, 3], [8, 16, 24, 32], 16


class ReadoutProject(nn.Module):  # the reference's ProjectReadout: Linear(2C, C) + GELU on [tokens, cls]
    def __init__(self, width):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x):
        readout = x[:, :1].expand_as(x[:, 1:])
        return self.project(torch.cat([x[:, 1:], readout], -1))


class ResidualConvUnitRef(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionRef(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnitRef(features)
        self.resConfUnit2 = ResidualConvUnitRef(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, *xs):
        out = xs[0] if len(xs) == 1 else xs[0] + self.resConfUnit1(xs[1])
        out = F.interpolate(self.resConfUnit2(out), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(out)


class Interpolate(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class OfficialDPT(nn.Module):
    """DPTDepthModel restated with the reference's module names (plain ViT, readout ``project``)."""

    def __init__(self):
        super().__init__()
        self.pretrained = nn.Module()
        self.pretrained.model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT)
        width = VIT["embed_dim"]
        resample = [nn.ConvTranspose2d(WIDTHS[0], WIDTHS[0], 4, stride=4),
                    nn.ConvTranspose2d(WIDTHS[1], WIDTHS[1], 2, stride=2), None,
                    nn.Conv2d(WIDTHS[3], WIDTHS[3], 3, stride=2, padding=1)]
        for i in range(4):  # [readout, Transpose, Unflatten, 1x1 conv, resample]
            layers = [ReadoutProject(width), nn.Identity(), nn.Identity(), nn.Conv2d(width, WIDTHS[i], 1)]
            setattr(self.pretrained, f"act_postprocess{i + 1}",
                    nn.Sequential(*layers, *([resample[i]] if resample[i] is not None else [])))
        self.scratch = nn.Module()
        for i in range(4):
            setattr(self.scratch, f"layer{i + 1}_rn", nn.Conv2d(WIDTHS[i], FEATURES, 3, padding=1, bias=False))
            setattr(self.scratch, f"refinenet{i + 1}", FeatureFusionRef(FEATURES))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(FEATURES, FEATURES // 2, 3, padding=1), Interpolate(), nn.Conv2d(FEATURES // 2, 32, 3, padding=1),
            nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU(), nn.Identity())

    def forward(self, x):
        vit = self.pretrained.model
        b, _, h, w = x.shape
        tokens = vit.patch_embed(x)
        tokens = torch.cat([vit.cls_token.expand(b, -1, -1), tokens], 1) + vit.pos_embed
        taps = []
        for index, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if index in HOOKS:
                taps.append(tokens)
        grid = (h // 16, w // 16)
        layers = []
        for i, tap in enumerate(taps):
            post = getattr(self.pretrained, f"act_postprocess{i + 1}")
            y = post[0](tap).transpose(1, 2).reshape(b, -1, *grid)
            for module in list(post)[3:]:
                y = module(y)
            layers.append(getattr(self.scratch, f"layer{i + 1}_rn")(y))
        path = self.scratch.refinenet4(layers[3])
        path = self.scratch.refinenet3(path, layers[2])
        path = self.scratch.refinenet2(path, layers[1])
        path = self.scratch.refinenet1(path, layers[0])
        return self.scratch.output_conv(path)


def dpt_recipe(weights, **model):
    return build_recipe({"task": "depth", "model": {
        "name": "vit_tiny_patch16_224", "kwargs": {k: v for k, v in VIT.items()}, "hooks": HOOKS,
        "reassemble": WIDTHS, "features": FEATURES, "output": "relative", "weights": str(weights), **model},
        "data": {"image_size": 64}})


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    torch.manual_seed(0)
    official = OfficialDPT().eval()
    for p in official.parameters():  # away from the init (zero biases would hide a mix-up)
        p.data.add_(0.05 * torch.randn_like(p))
    official.scratch.output_conv[4].bias.data.fill_(0.5)  # most outputs above the final ReLU
    file = tmp_path_factory.mktemp("dpt") / "dpt_official.pt"
    torch.save(official.state_dict(), file)
    return official, file


def test_an_official_layout_state_dict_loads_strictly_and_matches_the_restatement(released):
    official, file = released
    model = Task(dpt_recipe(file)).build_model().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = official(images), model(images)
    assert got.shape == expected.shape == (2, 1, 64, 64)
    assert (expected > 0).float().mean() > 0.5 and expected.std() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_converter_maps_every_released_name(released):
    official, file = released
    state = convert_dpt(Checkpoint(file, raw=torch.load(file, weights_only=True)))
    assert "pretrained.model.head.weight" in official.state_dict() and "backbone.head.weight" not in state
    assert dfx_name("pretrained.act_postprocess4.4.weight") == "reassemble.3.resample.weight"
    assert dfx_name("scratch.refinenet1.resConfUnit1.conv2.bias") == "fusion.0.skip_unit.conv2.bias"
    assert dfx_name("scratch.output_conv.4.bias") == "head.out.bias"
    assert dfx_name("pretrained.act_postprocess1.0.project.0.weight") == "reassemble.0.readout.project.0.weight"
    assert convert_dpt(Checkpoint(file, raw={"encoder.weight": torch.zeros(1)})) is None  # not a DPT release


def test_a_release_of_other_sizes_is_refused_naming_the_keys(released):
    _, file = released
    with pytest.raises(UsageError, match=r"layer_rn.0.weight: checkpoint \(16, 8, 3, 3\) vs model \(24, 8, 3, 3\)"):
        Task(dpt_recipe(file, features=24)).build_model()
