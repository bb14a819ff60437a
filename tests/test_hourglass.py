"""The Expedit hourglass wrapper against a reference written here that runs a base ViT's blocks by hand.

Models are tiny timm ViTs (8×8 patch grids, 6 blocks) in float64, so outputs compare to 1e-10.
"""

import copy
import pickle

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfx.cluster import hourglass, token_clustering, token_reconstruction
from dfx.cluster.wrapper import HourglassViT, cluster_grid

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3)
KINDS = {
    "vit": ("vit_tiny_patch16_224", {}),  # class token
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),  # class + distillation token
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4, no_embed_class=True)),  # class + 4 registers
    "no-prefix": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "dynamic": ("vit_tiny_patch16_224", dict(dynamic_img_size=True)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one BLAS thread is fastest on a loaded shared machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(kind="vit", num_classes=5, **overrides):
    name, kwargs = KINDS[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, **{**TINY, **kwargs, **overrides})
    return model.double().eval()


def images(batch=2, height=64, width=64):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ---------------------------------------------------------------- reference: the blocks run by hand


def reference_tokens(vit, x, cluster_ratio, alpha, iters=5, temperature=0.02, window=5, k=20, taken=()):
    """Final tokens (before the norm) and the outputs of the blocks in `taken`, all [B, P + H*W, C]."""
    patch = vit.patch_embed.patch_size[0]
    height, width = x.shape[-2] // patch, x.shape[-1] // patch
    h, w = max(1, round(height * cluster_ratio**0.5)), max(1, round(width * cluster_ratio**0.5))
    prefix = vit.num_prefix_tokens
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outputs = {}
    for index in range(alpha):
        tokens = vit.blocks[index](tokens)
        outputs[index] = tokens
    before = tokens[:, prefix:]
    batch, _, channels = before.shape
    patch_map = before.transpose(1, 2).reshape(batch, channels, height, width)
    centres = token_clustering(patch_map, (h, w), iters, temperature, window)
    tokens = torch.cat([tokens[:, :prefix], centres], 1)

    def restore(y):
        return torch.cat([y[:, :prefix], token_reconstruction(y[:, prefix:], before, centres, k, temperature)], 1)

    for index in range(alpha, len(vit.blocks)):
        tokens = vit.blocks[index](tokens)
        outputs[index] = restore(tokens)  # each output reconstructed on its own
    return restore(tokens), [outputs[index] for index in taken]


# ---------------------------------------------------------------- agreement with the reference


@pytest.mark.parametrize("kind", ["vit", "deit-distilled", "registers", "no-prefix"])
def test_matches_blocks_run_by_hand(kind):
    vit = tiny_vit(kind)
    x = images()
    fast = hourglass(vit, cluster_ratio=0.5, alpha=2)
    expected, _ = reference_tokens(vit, x, 0.5, alpha=2)
    torch.testing.assert_close(fast.forward_features(x), vit.norm(expected), rtol=0, atol=1e-10)
    torch.testing.assert_close(fast(x), vit.forward_head(vit.norm(expected)), rtol=0, atol=1e-10)
    assert fast.forward_features(x).shape == vit.forward_features(x).shape


@pytest.mark.parametrize("alpha, ratio, window", [(1, 0.3, 3), (4, 0.75, 5), (6, 0.5, 5)])
def test_alpha_and_ratio_conventions(alpha, ratio, window):
    """alpha = blocks at full resolution (alpha = depth: cluster, then reconstruct at once)."""
    vit, x = tiny_vit("deit-distilled"), images()
    fast = hourglass(vit, cluster_ratio=ratio, alpha=alpha, iters=3, temperature=0.05, window=window, k=7)
    expected, _ = reference_tokens(vit, x, ratio, alpha, iters=3, temperature=0.05, window=window, k=7)
    torch.testing.assert_close(fast.forward_features(x), vit.norm(expected), rtol=0, atol=1e-10)


def test_non_square_dynamic_grid():
    vit, x = tiny_vit("dynamic"), images(height=64, width=96)  # 8×12 patches -> 6×8 centres
    fast = hourglass(vit, cluster_ratio=0.5, alpha=3)
    expected, _ = reference_tokens(vit, x, 0.5, alpha=3)
    torch.testing.assert_close(fast.forward_features(x), vit.norm(expected), rtol=0, atol=1e-10)
    assert fast.forward_features(x).shape == (2, 1 + 8 * 12, 48)


@pytest.mark.parametrize("kind", ["vit", "deit-distilled", "registers"])
def test_full_grid_without_iterations_is_the_base_model(kind):
    """r = 1 and iters = 0: the centres are the tokens; a huge temperature makes every reconstruction
    row one-hot on the token's own centre, so the output is the base model's."""
    vit, x = tiny_vit(kind), images()
    fast = hourglass(vit, cluster_ratio=1.0, alpha=2, iters=0, temperature=1e8)
    torch.testing.assert_close(fast.forward_features(x), vit.forward_features(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(fast(x), vit(x), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- forward_intermediates


def test_intermediates_full_resolution_and_shared_weights():
    vit, x = tiny_vit("deit-distilled"), images()
    fast = hourglass(vit, cluster_ratio=0.5, alpha=2)
    taken = [0, 1, 2, 5]  # before, at and after the clustering point
    final, intermediates = fast.forward_intermediates(x, indices=taken)
    expected_final, expected = reference_tokens(vit, x, 0.5, alpha=2, taken=taken)
    torch.testing.assert_close(final, vit.norm(expected_final), rtol=0, atol=1e-10)
    assert [y.shape for y in intermediates] == [(2, 48, 8, 8)] * 4
    for got, want in zip(intermediates, expected):
        want = want[:, 2:].transpose(1, 2).reshape(2, 48, 8, 8)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # blocks before alpha are the base model's own outputs
    _, base = vit.forward_intermediates(x, indices=[0, 1])
    torch.testing.assert_close(intermediates[:2], base, rtol=0, atol=0)


def test_intermediates_options_follow_timm():
    vit, x = tiny_vit("registers"), images()
    fast = hourglass(vit, cluster_ratio=0.5, alpha=2)
    _, expected = reference_tokens(vit, x, 0.5, alpha=2, taken=[4, 5])  # indices=2: the last two
    pairs = fast.forward_intermediates(
        x, indices=2, norm=True, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
    )
    for (patches, prefix), want in zip(pairs, expected):
        want = vit.norm(want)  # the norm after the reconstruction, as for the final features
        torch.testing.assert_close(patches, want[:, 5:], rtol=0, atol=1e-10)
        torch.testing.assert_close(prefix, want[:, :5], rtol=0, atol=1e-10)
    result = fast.forward_intermediates(x, indices=[4], output_dict=True, return_prefix_tokens=True)
    assert result["image_intermediates"][0].shape == (2, 48, 8, 8)
    assert result["image_intermediates_prefix"][0].shape == (2, 5, 48)
    assert result["image_features"].shape == (2, 5 + 64, 48)
    assert fast.get_intermediate_layers(x, n=2, reshape=True)[0].shape == (2, 48, 8, 8)


def test_stop_early():
    vit, x = tiny_vit(), images()
    fast = hourglass(vit, cluster_ratio=0.5, alpha=3)
    # the last wanted block comes before the clustering point: no clustering at all
    final, early = fast.forward_intermediates(x, indices=[1], stop_early=True)
    base_final, base_early = vit.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close((final, early), (base_final, base_early), rtol=0, atol=0)
    final, late = fast.forward_intermediates(x, indices=[4], stop_early=True)
    _, expected = reference_tokens(vit, x, 0.5, alpha=3, taken=[4])
    torch.testing.assert_close(final, vit.norm(expected[0]), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- cost


def block_token_counts(model, x):
    counts = []
    handles = [block.register_forward_hook(lambda m, args, out: counts.append(out.shape[1])) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return counts


@pytest.mark.parametrize("kind, prefix", [("vit", 1), ("deit-distilled", 2), ("registers", 5), ("no-prefix", 0)])
def test_blocks_after_alpha_see_prefix_plus_clustered_tokens(kind, prefix):
    fast = hourglass(tiny_vit(kind), cluster_ratio=0.5, alpha=2)  # 8×8 -> 6×6
    assert block_token_counts(fast, images()) == [prefix + 64] * 2 + [prefix + 36] * 4


def test_grid_keeps_the_aspect_ratio():
    assert cluster_grid((40, 40), 0.5) == (28, 28)  # the paper's Segmenter setting
    assert cluster_grid((24, 64), 0.25) == (12, 32)
    assert cluster_grid((3, 1), 0.01) == (1, 1)
    assert cluster_grid((14, 14), 1) == (14, 14)


def test_flops_drop_as_expected():
    """Counted FLOPs at r = 0.5: the base's, less 4 blocks' worth of 16·16 - 11·11 tokens, plus
    what one clustering and one reconstruction of those shapes cost on their own."""
    vit = timm.create_model("vit_tiny_patch16_224", img_size=128, patch_size=8, embed_dim=96, depth=6, num_heads=3)
    for block in vit.blocks:
        block.attn.fused_attn = False  # the counter sees explicit matmuls, not CPU fused attention
    vit.eval()
    fast = hourglass(vit, cluster_ratio=0.5, alpha=2)  # 16×16 -> 11×11 after 2 of 6 blocks
    x = torch.randn(1, 3, 128, 128)

    def counted(function, *args):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            function(*args)
        return counter.get_total_flops()

    def block_flops(tokens, channels=96, hidden=384):
        linear = 2 * tokens * channels * (4 * channels + 2 * hidden)  # qkv, proj, mlp
        return linear + 2 * 2 * tokens * tokens * channels  # q·k and attention·v

    base, clustered = counted(vit, x), counted(fast, x)
    blocks_only = base - 4 * (block_flops(1 + 256) - block_flops(1 + 121))
    overhead = counted(token_clustering, torch.randn(1, 96, 16, 16), (11, 11)) + counted(
        token_reconstruction, torch.randn(1, 121, 96), torch.randn(1, 256, 96), torch.randn(1, 121, 96)
    )
    assert clustered == blocks_only + overhead
    assert clustered < 0.75 * base
    # clustering is relatively dear in this narrow model (24% of the saving): per token it costs
    # about C, a block about C²
    assert overhead < 0.3 * (base - blocks_only)


# ---------------------------------------------------------------- an ordinary module


def test_base_model_unchanged_and_weights_shared():
    vit, x = tiny_vit(), images()
    before = vit(x)
    fast = hourglass(vit, cluster_ratio=0.5)
    assert type(vit) is timm.models.vision_transformer.VisionTransformer
    assert isinstance(fast, HourglassViT) and isinstance(fast, type(vit))
    torch.testing.assert_close(vit(x), before, rtol=0, atol=0)
    assert fast.blocks is vit.blocks and fast.cls_token is vit.cls_token
    fast.register_forward_hook(lambda *args: pytest.fail("hook leaked to the base model"))
    vit(x)
    assert fast.hourglass_config.alpha == 2  # round(0.4 * 6)


def test_state_dict_keys_load_both_ways():
    vit, other = tiny_vit(), tiny_vit()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(1)
    fast = hourglass(vit)
    assert list(fast.state_dict()) == list(vit.state_dict())
    fast.load_state_dict(other.state_dict())
    torch.testing.assert_close(vit.state_dict(), other.state_dict(), rtol=0, atol=0)
    fresh = tiny_vit()
    fresh.load_state_dict(fast.state_dict())


def test_pickle_deepcopy_and_rewrap():
    vit, x = tiny_vit(), images()
    fast = hourglass(vit, cluster_ratio=0.5)
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert type(clone).__name__ == "HourglassVisionTransformer"
        torch.testing.assert_close(clone(x), fast(x), rtol=0, atol=0)
        assert clone.blocks is not vit.blocks
    rewrapped = hourglass(fast, cluster_ratio=0.75, alpha=4)
    assert type(rewrapped).base_class is type(vit)
    assert block_token_counts(rewrapped, x) == [65] * 4 + [1 + 49] * 2


def test_gradients_flow_in_train_mode():
    vit = tiny_vit("deit-distilled").train()
    fast = hourglass(vit, cluster_ratio=0.5, alpha=2)
    fast.set_distilled_training(True)
    logits, distilled = fast(images())  # the distillation head only answers in training
    (logits.square().sum() + distilled.square().sum()).backward()
    names = ["patch_embed.proj.weight", "cls_token", "dist_token"]  # the prefix tokens, kept aside
    names += ["blocks.0.mlp.fc1.weight", "blocks.5.mlp.fc1.weight"]  # before and after the clustering
    for name in names:
        grad = fast.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches():
    vit, x = tiny_vit(), images()
    fast = hourglass(vit, cluster_ratio=0.5, alpha=2)
    expected = fast(x)
    fast.set_grad_checkpointing(True)
    out = fast(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert fast.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    vit, x = tiny_vit(), images()
    fast = hourglass(copy.deepcopy(vit), cluster_ratio=0.5, alpha=2)
    expected = fast(x)
    fast.cuda()
    torch.testing.assert_close(fast(x.cuda()).cpu(), expected, rtol=0, atol=1e-8)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cluster_ratio=0), r"cluster_ratio must be a number in \(0, 1\], got 0"),
        (dict(cluster_ratio=1.5), r"cluster_ratio must be a number in \(0, 1\], got 1.5"),
        (dict(cluster_ratio=True), r"cluster_ratio .* got True"),
        (dict(alpha=0), r"alpha .* in \[1, 6\] .* got 0"),
        (dict(alpha=7), r"alpha .* in \[1, 6\] .* got 7"),
        (dict(alpha=2.0), r"alpha .* got 2.0"),
        (dict(iters=-1), r"iters must be an integer >= 0, got -1"),
        (dict(k=0), r"k must be an integer >= 1, got 0"),
        (dict(temperature=-1.0), r"temperature .* got -1.0"),
        (dict(window=4), r"window must be a positive odd integer, got 4"),
        (dict(cluster_ratio=0.25), r"window=5 does not fit the 4x4 clustered token grid .* in \[1, 4\]"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hourglass(tiny_vit(), **kwargs)


def test_bad_models():
    with pytest.raises(ValueError, match="must be a timm VisionTransformer .* got ResNet"):
        hourglass(timm.create_model("resnet10t"))

    class Compiled(torch.nn.Module):  # what torch.compile returns: the model kept as `_orig_mod`
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

    with pytest.raises(ValueError, match="wrap the model before torch.compile"):
        hourglass(Compiled(tiny_vit()))


def test_bad_inputs_at_forward():
    fast = hourglass(tiny_vit("dynamic"), cluster_ratio=0.5)  # 8×8 -> 6×6 fits window 5
    with pytest.raises(ValueError, match=r"window=5 does not fit the 3x3 clustered token grid .* 4x4 patch grid"):
        fast(images(height=32, width=32))
    # a dynamic-size model is checked at forward only: this ratio fits larger images
    small = hourglass(tiny_vit("dynamic"), cluster_ratio=0.25)
    assert block_token_counts(small, images(height=80, width=80)) == [101] * 2 + [1 + 25] * 4  # 10×10 -> 5×5
    with pytest.raises(ValueError, match=r"window=5 does not fit the 4x4 clustered token grid"):
        small(images())
    with pytest.raises(ValueError, match="attn_mask"):
        fast.forward_features(images(), attn_mask=torch.ones(65, 65, dtype=torch.bool))
    dropping = hourglass(tiny_vit(patch_drop_rate=0.5).train())
    with pytest.raises(ValueError, match="patch dropout"):
        dropping(images())
