"""Multi-modal MiT, fusion strategies, SegFormer head + ensemble, and loading official mit_b* weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from dfx import hub
from dfx.measure import count_flops
from dfx.errors import RunError
from dfx.fusion import GeminiFusion
from dfx.fusion.mit import MultiModalMiT, load_mit_weights
from dfx.fusion.segformer import FusionSegmenter
from dfx.fusion.strategies import CrossModalAttention, ModalityMerge, TokenExchange

TINY = {"embed_dims": [8, 16, 16, 16], "depths": [1, 2, 1, 1], "num_heads": [1, 2, 2, 2]}


def tiny_backbone(fusion="gemini", modalities=2, **kwargs) -> MultiModalMiT:
    torch.manual_seed(0)
    return MultiModalMiT("b0", modalities, fusion, **{**TINY, **kwargs}).eval()


def silence_fusion(backbone: MultiModalMiT) -> None:
    """Zero the fusion output projections: GeminiFusion then returns its inputs (y = x + 0)."""
    with torch.no_grad():
        for module in backbone.fusion_modules():
            for attn in (module.cross_attn_0_to_1, module.cross_attn_1_to_0):
                attn.out_proj.weight.zero_()
                attn.out_proj.bias.zero_()


def flops(fn) -> float:
    """Forward FLOPs of ``fn()``, with dfx.bench's counter (it counts CPU fused attention too)."""
    return count_flops(lambda _: fn(), None)


# ----------------------------------------------------------------------------------------- backbone


def test_feature_maps_have_mit_strides_and_one_entry_per_stream():
    images = torch.randn(2, 2, 3, 64, 96)
    for fusion, streams in (("gemini", 2), ("cross-attn", 2), ("exchange", 2), ("concat", 1), ("none", 1)):
        features = tiny_backbone(fusion)(images)
        assert [tuple(f.shape) for f in features] == [
            (streams, 2, 8, 16, 24), (streams, 2, 16, 8, 12), (streams, 2, 16, 4, 6), (streams, 2, 16, 2, 3)], fusion


def test_linear_and_conv_weights_are_shared_and_layernorms_are_per_modality():
    backbone = tiny_backbone("gemini")
    names = [n for n, _ in backbone.named_parameters()]
    # one tensor per shared layer: no per-modality copies of q, kv, sr, fc1, dwconv, patch embeddings
    assert names.count("block1.0.attn.q.weight") == 1 and "block1.0.mlp.dwconv.dwconv.weight" in names
    assert not any(".ln_" in n and ("attn.q" in n or "mlp" in n) for n in names)
    norms0 = {n for n in names if ".ln_0." in n}
    assert {n.replace(".ln_0.", ".ln_1.") for n in norms0} == {n for n in names if ".ln_1." in n}
    # 4 patch-embed norms + 5 blocks x (norm1, norm2, sr norm except in the last stage) + 4 stage norms
    assert len(norms0) == 2 * (4 + 5 * 2 + 4 + 4)

    silence_fusion(backbone)
    rgb = torch.randn(1, 1, 3, 32, 32)
    same = torch.cat([rgb, rgb], 1)
    features = backbone(same)
    for f in features:  # same input, same shared weights, equal (initial) norms: identical streams
        torch.testing.assert_close(f[0], f[1])
    with torch.no_grad():
        backbone.block1[0].norm1.ln_1.bias.add_(1.0)  # change the depth stream's norm only
    changed = backbone(same)
    for before, after in zip(features, changed):
        torch.testing.assert_close(after[0], before[0])  # RGB stream untouched
        assert (after[1] - before[1]).abs().max() > 1e-3  # depth stream changed


def test_every_block_holds_the_strategy_module():
    kinds = {"gemini": GeminiFusion, "cross-attn": CrossModalAttention, "exchange": TokenExchange}
    for fusion, kind in kinds.items():
        backbone = tiny_backbone(fusion)
        modules = backbone.fusion_modules()
        assert len(modules) == sum(TINY["depths"]) and all(isinstance(m, kind) for m in modules)
    for fusion in ("none", "concat"):
        assert tiny_backbone(fusion).fusion_modules() == []


def test_strategies_see_the_modalities_they_should():
    torch.manual_seed(1)
    images = torch.randn(2, 2, 3, 32, 32)
    other_depth = images.clone()
    other_depth[:, 1] = torch.randn(2, 3, 32, 32)
    for fusion in ("none", "concat", "exchange", "cross-attn", "gemini"):
        backbone = tiny_backbone(fusion)
        rgb_stream = backbone(images)[-1][0]
        moved = (backbone(other_depth)[-1][0] - rgb_stream).abs().max().item()
        if fusion == "none":
            assert moved == 0.0  # RGB only: depth is never read
        elif fusion == "exchange":
            assert moved == 0.0  # initial scores are near 0.5: no token is below 0.02, nothing exchanged
            with torch.no_grad():
                for module in backbone.fusion_modules():
                    module.score[0][-1].bias.fill_(-10.0)  # now every RGB token is exchanged
            rgb_stream = backbone(images)[-1][0]
            assert (backbone(other_depth)[-1][0] - rgb_stream).abs().max() > 1e-3
        else:
            assert moved > 1e-5, fusion  # depth reaches the RGB stream (fused or concatenated)
    # without a fusion module the two streams would be independent: silence GeminiFusion and check
    backbone = tiny_backbone("gemini")
    silence_fusion(backbone)
    assert torch.equal(backbone(images)[-1][0], backbone(other_depth)[-1][0])


def test_gemini_cost_is_linear_in_tokens_and_cross_attention_quadratic():
    torch.manual_seed(0)
    gemini, cross = GeminiFusion(64, heads=8), CrossModalAttention(64, heads=8)

    def cost(module, tokens):
        x0, x1 = torch.randn(1, tokens, 64), torch.randn(1, tokens, 64)
        return flops(lambda: module(x0, x1))

    assert cost(gemini, 4096) / cost(gemini, 1024) == pytest.approx(4.0, rel=1e-6)
    # matmul FLOPs of full attention: 2 * 2 * N^2 * C per direction on top of the projections
    cross_ratio = cost(cross, 4096) / cost(cross, 1024)
    assert cross_ratio > 12
    assert cost(cross, 4096) - 4 * cost(cross, 1024) == pytest.approx(2 * 4 * 64 * (4096**2 - 4 * 1024**2), rel=1e-6)


def test_token_exchange_replaces_low_scored_tokens_only():
    torch.manual_seed(0)
    module = TokenExchange(16, threshold=0.02)
    x0, x1 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        module.score[0][-1].bias.fill_(-10.0)  # sigmoid(-10) = 4.5e-5 < 0.02: every x0 token is replaced
        module.score[0][-1].weight.zero_()
        module.score[1][-1].bias.fill_(10.0)  # every x1 token is kept, scaled by its score
        module.score[1][-1].weight.zero_()
    y0, y1 = module(x0, x1)
    assert torch.equal(y0, x1)
    torch.testing.assert_close(y1, x1 * torch.sigmoid(torch.tensor(10.0)))
    assert module.exchanged == pytest.approx(0.5)
    assert module.sparsity.item() == pytest.approx(0.5 * (torch.sigmoid(torch.tensor(-10.0)) + torch.sigmoid(
        torch.tensor(10.0))).item(), rel=1e-5)


def test_more_than_two_modalities_are_merged_into_the_second_stream():
    backbone = tiny_backbone("gemini", modalities=4)
    assert backbone.streams == 2 and backbone.embed_streams == 4
    assert isinstance(backbone.merge1, ModalityMerge) and len(backbone.merge1.score_nets) == 3
    assert hasattr(backbone.patch_embed1.norm, "ln_3") and not hasattr(backbone.norm1, "ln_2")
    torch.manual_seed(2)
    images = torch.randn(1, 4, 3, 32, 32)
    features = backbone(images)
    assert features[0].shape == (2, 1, 8, 8, 8)
    lidar = images.clone()
    lidar[:, 3] = torch.randn(1, 3, 32, 32)
    changed = backbone(lidar)[-1]
    assert (changed[1] - features[-1][1]).abs().max() > 1e-2  # the 4th modality is merged into stream 1
    assert (changed[0] - features[-1][0]).abs().max() > 1e-5  # and reaches RGB through the fusion


def test_modality_merge_scores_on_the_token_map_reweights_then_takes_the_maximum():
    merge = ModalityMerge(4, inputs=2)
    with torch.no_grad():
        for net, bias in zip(merge.score_nets, (0.0, math.log(3.0))):  # sigmoid: 0.5 and 0.75
            net[0].weight.fill_(1.0)  # depthwise 3x3: sums each channel's neighbourhood
            net[0].bias.zero_()
            net[1].weight.zero_()
            net[1].bias.fill_(bias)
    a, b = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    merged, reweighted = merge([a, b], (2, 3))
    torch.testing.assert_close(merged, torch.maximum(1.5 * a, 1.75 * b))
    torch.testing.assert_close(reweighted[1], 1.75 * b)
    # the score sees the 3x3 neighbourhood on the token grid, not the token alone (a Linear would)
    x = torch.zeros(1, 6, 4)
    x[0, 0, 0] = 1.0  # one token set, at grid (0, 0) of a 2x3 grid
    with torch.no_grad():
        merge.score_nets[0][1].weight.fill_(1.0)
        reweighted = merge([x, x], (2, 3))[1][0]
        score = merge.score_nets[0](x.transpose(1, 2).reshape(1, 4, 2, 3)).flatten()
    expected = torch.sigmoid(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0]))  # neighbours of (0, 0) see it
    torch.testing.assert_close(score, expected)
    torch.testing.assert_close(reweighted, x * (1 + expected.view(1, 6, 1)))


# ------------------------------------------------------------------------------------ head, ensemble


def test_ensemble_is_the_softmax_weighted_sum_of_the_stream_logits():
    torch.manual_seed(0)
    model = FusionSegmenter(tiny_backbone("gemini"), num_classes=5, embed_dim=16).eval()
    with torch.no_grad():
        model.ensemble_weights.copy_(torch.tensor([math.log(3.0), 0.0]))  # softmax: 0.75, 0.25
    images = torch.randn(2, 2, 3, 32, 48)
    out = model(images, streams=True)
    assert [tuple(x.shape) for x in out["streams"]] == [(2, 5, 32, 48)] * 2
    torch.testing.assert_close(out["ensemble"], 0.75 * out["streams"][0] + 0.25 * out["streams"][1])
    torch.testing.assert_close(model(images), out["ensemble"])
    assert not torch.allclose(out["streams"][0], out["streams"][1])  # per-modality logits differ
    (out["ensemble"].sum()).backward()
    assert model.ensemble_weights.grad.abs().sum() > 0  # the weights are learned


def test_the_ensemble_loss_trains_the_ensemble_weights_only():
    torch.manual_seed(0)
    model = FusionSegmenter(tiny_backbone("gemini"), num_classes=5, embed_dim=16)
    images = torch.randn(2, 2, 3, 32, 32)
    model(images).square().mean().backward()
    assert model.ensemble_weights.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters()
               if n != "ensemble_weights")  # the reference detaches the streams inside the ensemble
    model.zero_grad(set_to_none=True)
    model.detach_ensemble = False  # the switch: the ensemble loss reaches the streams too
    model(images).square().mean().backward()
    assert model.decode_head.linear_pred.weight.grad.abs().sum() > 0
    single = FusionSegmenter(tiny_backbone("none"), num_classes=5, embed_dim=16)
    single(images).square().mean().backward()  # one stream: its ensemble is the stream, never detached
    assert single.decode_head.linear_pred.weight.grad.abs().sum() > 0


def test_a_list_of_modality_images_returns_streams_and_ensemble():
    torch.manual_seed(0)
    model = FusionSegmenter(tiny_backbone("gemini"), num_classes=5, embed_dim=16).eval()
    x0, x1 = torch.randn(1, 3, 32, 40), torch.randn(1, 3, 32, 40)
    out = model([x0, x1])
    torch.testing.assert_close(out["ensemble"], model(torch.stack([x0, x1], 1)))
    assert out["streams"][1].shape == (1, 5, 32, 40)
    with pytest.raises(ValueError, match="expected 2 images"):
        model([x0])


# ---------------------------------------------------------------------------- official mit_b* weights


def official_mit_names(depths, sr_ratios=(8, 4, 2, 1)) -> list[str]:
    """Parameter names of SegFormer's mit_b* ImageNet checkpoints, written from their layout."""
    names = []
    for stage, (depth, sr) in enumerate(zip(depths, sr_ratios), 1):
        names += [f"patch_embed{stage}.proj.weight", f"patch_embed{stage}.proj.bias",
                  f"patch_embed{stage}.norm.weight", f"patch_embed{stage}.norm.bias"]
        for j in range(depth):
            block = f"block{stage}.{j}"
            layers = ["norm1", "attn.q", "attn.kv", "attn.proj", "norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            if sr > 1:
                layers += ["attn.sr", "attn.norm"]
            names += [f"{block}.{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
        names += [f"norm{stage}.weight", f"norm{stage}.bias"]
    return names + ["head.weight", "head.bias"]


def synthetic_official_state(backbone: MultiModalMiT) -> dict[str, torch.Tensor]:
    """Random tensors under the official names, shaped like the (single-modality) MiT."""
    shapes = {}
    for name, tensor in backbone.state_dict().items():
        shapes[name.replace(".ln_0.", ".").replace(".ln_1.", ".")] = tensor.shape
    generator = torch.Generator().manual_seed(3)
    state = {name: torch.randn(shapes[name], generator=generator) for name in official_mit_names(TINY["depths"])
             if name in shapes}
    state["head.weight"], state["head.bias"] = torch.randn(1000, 16), torch.randn(1000)
    return state


def test_official_names_cover_the_backbone_exactly():
    backbone = tiny_backbone("gemini")
    ours = {n.replace(".ln_0.", ".").replace(".ln_1.", ".") for n in backbone.state_dict()
            if ".attn.fusion." not in n}
    assert ours == set(official_mit_names(TINY["depths"])) - {"head.weight", "head.bias"}


def test_official_weights_load_from_a_hub_cache_offline(tmp_path, monkeypatch):
    from test_hub import write_cache

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    backbone = tiny_backbone("gemini")
    state = synthetic_official_state(backbone)
    write_cache(cache, "dfx-test/mit", {"mit_b0.safetensors": state})
    path = hub.resolve("hf://dfx-test/mit/mit_b0.safetensors")
    fusion_before = {n: t.clone() for n, t in backbone.state_dict().items() if ".fusion." in n}
    report = load_mit_weights(backbone, hub.load_state_dict(path))
    loaded = backbone.state_dict()
    torch.testing.assert_close(loaded["block1.0.attn.q.weight"], state["block1.0.attn.q.weight"])
    torch.testing.assert_close(loaded["block1.0.attn.kv.weight"], state["block1.0.attn.kv.weight"])
    torch.testing.assert_close(loaded["block1.0.mlp.dwconv.dwconv.weight"], state["block1.0.mlp.dwconv.dwconv.weight"])
    for stream in (0, 1):  # the single LayerNorm goes to both modalities
        torch.testing.assert_close(loaded[f"block1.0.norm1.ln_{stream}.weight"], state["block1.0.norm1.weight"])
        torch.testing.assert_close(loaded[f"norm4.ln_{stream}.bias"], state["norm4.bias"])
    assert backbone.block1[0].norm1.ln_0.weight is not backbone.block1[0].norm1.ln_1.weight  # still two norms
    for name, tensor in fusion_before.items():  # not in the checkpoint: left as initialised
        assert torch.equal(loaded[name], tensor)
    assert report["unused"] == ["head.bias", "head.weight"]
    assert report["loaded"] == len(loaded) - len(fusion_before)


def test_official_weights_with_mmseg_prefix_and_concat_stem():
    backbone = tiny_backbone("concat")
    state = synthetic_official_state(tiny_backbone("gemini"))
    load_mit_weights(backbone, {f"backbone.{k}": v for k, v in state.items()})
    stem = backbone.patch_embed1.proj.weight  # [8, 6, 7, 7] over RGB and depth
    torch.testing.assert_close(stem[:, :3], state["patch_embed1.proj.weight"] / 2)
    torch.testing.assert_close(stem[:, 3:], state["patch_embed1.proj.weight"] / 2)


def test_wrong_or_foreign_weights_fail_with_a_clear_message():
    backbone = tiny_backbone("gemini")
    state = synthetic_official_state(backbone)
    state["block1.0.attn.q.weight"] = torch.randn(64, 64)
    with pytest.raises(RunError, match=r"mit_b3.pth: block1\.0\.attn\.q\.weight has shape \[64, 64\] but MiT-B0 "
                                       r"expects \[8, 8\]; is this the checkpoint of another MiT variant"):
        load_mit_weights(backbone, state, source="mit_b3.pth")
    with pytest.raises(RunError, match=r"not a SegFormer mit_b\* state dict: .* missing .*patch_embed1\.proj\.weight"):
        load_mit_weights(backbone, {"conv1.weight": torch.randn(3)}, source="resnet.pth")


def test_weights_file_is_saved_and_read_as_safetensors(tmp_path):
    backbone = tiny_backbone("gemini")
    state = synthetic_official_state(backbone)
    save_file(state, str(tmp_path / "mit_b0.safetensors"))
    report = load_mit_weights(backbone, hub.load_state_dict(hub.resolve(tmp_path / "mit_b0.safetensors")))
    assert report["loaded"] > 0
