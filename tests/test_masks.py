"""MaskDINO's mask branch on the one detector: shapes, a direct restatement, and the switch's reach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfx.detection import DeformableDETR, DetectorConfig

TINY = dict(num_classes=3, backbone="resnet10t", frozen_bn=False, dim=32, heads=4, levels=4, points=2,
            encoder_layers=1, decoder_layers=2, ffn_dim=64, dropout=0.0, one2one_queries=5)
DINO = dict(two_stage=True, two_stage_scoring="class_aware", box_refine=True, query_position="per_layer",
            decoder_norm=True, encoder_loss="selected", inverse_sigmoid_eps=1e-3)
TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def build(seed=0, **overrides) -> DeformableDETR:
    torch.manual_seed(seed)
    return DeformableDETR(DetectorConfig(**{**TINY, **DINO, "masks": True, **overrides}))


def images():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 80, generator=generator)


def test_every_prediction_carries_stride_4_masks():
    model = build(dn_queries=6).train()
    out = model(images(), None, TARGETS)
    assert out["pred_masks"].shape == (2, 5, 16, 20)
    # the initial queries' prediction comes first: decoder_layers predictions + 1 in all
    assert len(out["aux_outputs"]) == TINY["decoder_layers"]
    for layer in [*out["aux_outputs"], out["enc_outputs"]]:
        assert layer["pred_masks"].shape == (2, 5, 16, 20)
    # denoising queries get masks too: 6 // (2 objects) = 3 groups of 2 positive + 2 negative slots
    assert out["dn"]["pred_masks"].shape == (2, 12, 16, 20)
    assert all(layer["pred_masks"].shape == (2, 12, 16, 20) for layer in out["dn"]["aux_outputs"])


def _capture(module, store, key):
    return module.register_forward_hook(lambda _m, _i, output: store.__setitem__(key, output))


def test_masks_equal_a_direct_computation():
    model = build().eval()
    seen = {}
    hooks = [_capture(model.backbone, seen, "backbone"), _capture(model.encoder, seen, "memory"),
             _capture(model.decoder, seen, "decoder")]
    with torch.no_grad():
        out = model(images())
    for hook in hooks:
        hook.remove()
    head = model.mask_head
    stage4 = seen["backbone"][0][0][0]
    assert stage4.shape[-2:] == (16, 20)  # the stride-4 stage of resnet10t on 64x80
    memory = seen["memory"]
    encoded8 = memory[:, : 8 * 10].reshape(2, 8, 10, 32).permute(0, 3, 1, 2)
    # restated from the module docstring with the parameters read directly
    lateral = F.group_norm(F.conv2d(stage4, head.lateral[0].weight), head.lateral[1].num_groups,
                           head.lateral[1].weight, head.lateral[1].bias)
    summed = lateral + F.interpolate(encoded8, size=(16, 20), mode="bilinear", align_corners=False)
    y = F.relu(F.group_norm(F.conv2d(summed, head.output[0].weight, padding=1), head.output[1].num_groups,
                            head.output[1].weight, head.output[1].bias))
    pixels = F.conv2d(y, head.mask_features.weight, head.mask_features.bias)

    def embed(queries):
        fc = head.mask_embed.layers
        return fc[2](F.relu(fc[1](F.relu(fc[0](queries)))))

    states = seen["decoder"][0]
    norm = model.decoder.norm
    for layer, state in zip([*out["aux_outputs"][1:], out], states):
        expected = (embed(norm(state))[..., None, None] * pixels[:, None]).sum(2)
        assert torch.allclose(layer["pred_masks"], expected, atol=1e-4)
    assert out["pred_masks"].abs().max() > 1e-2  # a real signal, not zeros matching zeros


def test_initial_prediction_is_the_selected_queries():
    """Without learned content the initial queries are the selected proposals' tokens: same masks,
    same boxes, as MaskDINO's interm and initial predictions."""
    model = build().eval()
    with torch.no_grad():
        out = model(images())
    initial, enc = out["aux_outputs"][0], out["enc_outputs"]
    assert torch.allclose(initial["pred_masks"], enc["pred_masks"], atol=1e-5)
    assert torch.allclose(initial["pred_boxes"], enc["pred_boxes"], atol=1e-6)


def test_the_switch_leaves_boxes_and_classes_unchanged():
    with_masks = build().eval()
    without = DeformableDETR(DetectorConfig(**{**TINY, **DINO})).eval()
    missing, unexpected = without.load_state_dict(with_masks.state_dict(), strict=False)
    assert not missing and unexpected and all(name.startswith("mask_head.") for name in unexpected)
    with torch.no_grad():
        a, b = with_masks(images()), without(images())
    assert "pred_masks" not in b and len(b["aux_outputs"]) == TINY["decoder_layers"] - 1
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-6)


def test_mask_gradients_reach_the_stride_4_stage_and_the_encoder():
    model = build().train()
    out = model(images())
    out["pred_masks"].sigmoid().mean().backward()
    # timm starts each block's last BatchNorm at zero, so the block's convs see no gradient yet: its
    # BatchNorm weight does
    stage4 = model.backbone.body.layer1[0].bn2.weight
    assert stage4.grad is not None and stage4.grad.abs().sum() > 0
    assert model.encoder.layers[0].norm2.weight.grad.abs().sum() > 0
    assert model.mask_head.lateral[0].weight.grad.abs().sum() > 0


def test_masks_need_two_stage():
    with pytest.raises(ValueError, match="masks: .*two_stage"):
        DetectorConfig(**{**TINY, "masks": True}).validate()


def test_the_criterion_trains_every_mask_of_the_model():
    """Matching, decoder, initial, encoder and denoising predictions all get mask terms; one step of
    gradient reaches the mask branch."""
    from dfx.detection import SetCriterion
    from dfx.detection.loss_config import MASKDINO_SET_LOSS, MaskLossConfig

    model = build(dn_queries=6).train()
    frame = torch.zeros(3, 64, 80)
    frame[0, 8:24, 16:40] = 1
    frame[1, 16:48, 24:72] = 1
    frame[2, 0:32, 0:40] = 1
    targets = [{**TARGETS[0], "masks": frame[:2]}, {**TARGETS[1], "masks": frame[2:]}]
    criterion = SetCriterion.from_config(3, MASKDINO_SET_LOSS, masks=MaskLossConfig(mask_points=64))
    seen = []
    original = criterion.terms

    def counting(outputs, *args):
        terms = original(outputs, *args)
        seen.append("mask" in terms and "dice" in terms)
        return terms

    criterion.terms = counting
    total, logs = criterion(model(images(), None, targets), targets)
    # (decoder layers + initial) x (matching + denoising) + encoder
    assert seen == [True] * (2 * (TINY["decoder_layers"] + 1) + 1)
    assert logs["loss_mask"] > 0 and logs["loss_dice"] > 0 and torch.isfinite(total)
    total.backward()
    assert model.mask_head.mask_embed.layers[0].weight.grad.abs().sum() > 0


def test_dn_masks_off_is_maskdino_standard_denoising():
    """dn_masks false (MaskDINO's dn "standard"): the denoising queries carry no masks, so only the
    matching and encoder predictions get mask terms; the matching queries' outputs are unchanged."""
    from dfx.detection import SetCriterion
    from dfx.detection.loss_config import MASKDINO_SET_LOSS, MaskLossConfig

    frame = torch.zeros(3, 64, 80)
    frame[0, 8:24, 16:40] = 1
    frame[1, 16:48, 24:72] = 1
    frame[2, 0:32, 0:40] = 1
    targets = [{**TARGETS[0], "masks": frame[:2]}, {**TARGETS[1], "masks": frame[2:]}]
    seg, standard = build(dn_queries=6).train(), build(dn_queries=6, dn_masks=False).train()
    torch.manual_seed(3)
    with_masks = seg(images(), None, targets)
    torch.manual_seed(3)
    without = standard(images(), None, targets)
    assert "pred_masks" in with_masks["dn"] and "pred_masks" not in without["dn"]
    assert all("pred_masks" not in layer for layer in without["dn"]["aux_outputs"])
    assert torch.equal(with_masks["pred_masks"], without["pred_masks"])
    assert torch.equal(with_masks["dn"]["pred_boxes"], without["dn"]["pred_boxes"])
    criterion = SetCriterion.from_config(3, MASKDINO_SET_LOSS, masks=MaskLossConfig(mask_points=64))
    seen = []
    original = criterion.terms
    criterion.terms = lambda outputs, *args: seen.append("mask" in (t := original(outputs, *args))) or t
    criterion(without, targets)
    assert seen.count(True) == TINY["decoder_layers"] + 1 + 1 and seen.count(False) == TINY["decoder_layers"] + 1


def test_class_norm_classifies_normed_outputs_as_maskdino():
    """class_norm: each decoder layer's class logits are the head on the norm of its (already normed)
    output, like a model whose head is preceded by that norm; boxes and masks are unchanged, and the
    selected proposals are classified from their normed tokens."""
    on, off = build(class_norm=True).eval(), build().eval()
    with torch.no_grad():
        for model in (on, off):  # an affine norm (at init, norm(norm(x)) = norm(x) and nothing would differ)
            generator = torch.Generator().manual_seed(5)
            model.decoder.norm.weight.copy_(1 + torch.randn(model.decoder.norm.weight.shape, generator=generator))
            model.decoder.norm.bias.copy_(torch.randn(model.decoder.norm.bias.shape, generator=generator))
        a = on(images())
        b = off(images())
        assert torch.equal(a["pred_boxes"], b["pred_boxes"]) and torch.equal(a["pred_masks"], b["pred_masks"])
        assert not torch.allclose(a["pred_logits"], b["pred_logits"])
        assert not torch.allclose(a["enc_outputs"]["pred_logits"], b["enc_outputs"]["pred_logits"])
        for i, head in enumerate(off.class_heads):  # the second norm, restated
            off.class_heads[i] = torch.nn.Sequential(off.decoder.norm, head)
        c = off(images())
    for mine, restated in zip([a, *a["aux_outputs"][1:]], [c, *c["aux_outputs"][1:]]):  # [0]: initial queries
        assert torch.allclose(mine["pred_logits"], restated["pred_logits"], atol=1e-6)
    assert torch.equal(a["aux_outputs"][0]["pred_logits"], b["aux_outputs"][0]["pred_logits"])  # normed once already
    with pytest.raises(ValueError, match="class_norm"):
        DetectorConfig(**{**TINY, **DINO, "class_norm": True}).validate()


@pytest.mark.parametrize("kind, extra", [("mask2box", 0), ("bitmask", 1)])
def test_mask_boxes_initialise_the_decoder(kind, extra):
    """MaskDINO's initialize_box_type: the first references are the boxes of the proposals' masks."""
    from torchvision.ops import box_convert, masks_to_boxes

    model = build(initialize_box_type=kind).eval()
    with torch.no_grad():
        out = model(images())
    inside = out["enc_outputs"]["pred_masks"] > 0
    assert inside.flatten(2).any(-1).all()  # every proposal's mask has pixels: torchvision can box them
    xyxy = masks_to_boxes(inside.flatten(0, 1).float()).view(2, 5, 4) + torch.tensor([0.0, 0, extra, extra])
    expected = box_convert(xyxy, "xyxy", "cxcywh") / torch.tensor([20.0, 16, 20, 16])  # the 20x16 stride-4 grid
    initial = out["aux_outputs"][0]["pred_boxes"]  # the initial prediction's boxes are the references
    assert torch.allclose(initial, expected.clamp(1e-3, 1 - 1e-3), atol=1e-5)
    assert not torch.allclose(initial, out["enc_outputs"]["pred_boxes"], atol=1e-2)
    with pytest.raises(ValueError, match="initialize_box_type .* set masks: true"):
        DetectorConfig(**{**TINY, **DINO, "initialize_box_type": kind}).validate()
