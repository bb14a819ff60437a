"""Manifold distillation: relation losses against loop references, the combined loss, block hooks."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from dfx.distill import BlockFeatures, distillation_loss, manifold_losses, patch_tokens

TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, num_classes=5)


# ---------------------------------------------------------------- references (float64, explicit loops)


def unit_rows(x):
    return x / x.norm(dim=-1, keepdim=True)


def relation_sq_error(tokens_s, tokens_t):
    """Sum over pairs (i, j) of (<t_i, t_j> - <s_i, s_j>)^2 for lists of unit vectors, and the pair count."""
    total = 0.0
    for i in range(len(tokens_s)):
        for j in range(len(tokens_s)):
            total += (float(tokens_t[i] @ tokens_t[j]) - float(tokens_s[i] @ tokens_s[j])) ** 2
    return total, len(tokens_s) ** 2


def reference_losses(f_s, f_t, picked):
    f_s, f_t = unit_rows(f_s.double()), unit_rows(f_t.double())
    batch, tokens = f_s.shape[:2]
    patch = sum(relation_sq_error(f_s[b], f_t[b])[0] for b in range(batch)) / (batch * tokens * tokens)
    sample = sum(relation_sq_error(f_s[:, n], f_t[:, n])[0] for n in range(tokens)) / (tokens * batch * batch)
    positions = [divmod(int(i), tokens) for i in picked]
    rand_sum, pairs = relation_sq_error([f_s[b, n] for b, n in positions], [f_t[b, n] for b, n in positions])
    return {"patch": patch, "sample": sample, "rand": rand_sum / pairs}


def drawn_indices(seed, count, k):
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:k]


@pytest.fixture
def features():
    torch.manual_seed(0)
    return torch.randn(3, 5, 8), torch.randn(3, 5, 12)  # different widths


# ---------------------------------------------------------------- manifold_losses


def test_manifold_losses_match_loop_reference(features):
    f_s, f_t = features
    losses = manifold_losses(f_s, f_t, k=7, generator=torch.Generator().manual_seed(3))
    expected = reference_losses(f_s, f_t, drawn_indices(3, 15, 7))
    assert set(losses) == {"patch", "sample", "rand"}
    for name, value in losses.items():
        assert value.dim() == 0 and value.dtype == torch.float32
        assert value.item() == pytest.approx(expected[name], rel=1e-5), name
    # The three relations are different quantities on these inputs.
    assert len({round(v, 6) for v in expected.values()}) == 3


def test_manifold_losses_float64_kept(features):
    f_s, f_t = (f.double() for f in features)
    losses = manifold_losses(f_s, f_t, k=15, generator=torch.Generator().manual_seed(1))
    expected = reference_losses(f_s, f_t, drawn_indices(1, 15, 15))
    for name, value in losses.items():
        assert value.dtype == torch.float64
        assert value.item() == pytest.approx(expected[name], rel=1e-12)


def test_rand_is_reproducible_and_seed_dependent(features):
    f_s, f_t = features
    first = manifold_losses(f_s, f_t, 4, generator=torch.Generator().manual_seed(11))["rand"]
    again = manifold_losses(f_s, f_t, 4, generator=torch.Generator().manual_seed(11))["rand"]
    other = manifold_losses(f_s, f_t, 4, generator=torch.Generator().manual_seed(12))["rand"]
    assert first.item() == again.item()
    assert other.item() != pytest.approx(first.item(), rel=1e-3)


def test_k_larger_than_tokens_uses_all_tokens(features):
    f_s, f_t = features
    rand = manifold_losses(f_s, f_t, k=1000, generator=torch.Generator().manual_seed(0))["rand"]
    # All 15 tokens in any order: the mean over the full relation does not depend on the order.
    assert rand.item() == pytest.approx(reference_losses(f_s, f_t, range(15))["rand"], rel=1e-5)


def test_same_relations_give_zero_loss_across_widths():
    """A width-changing isometry keeps every relation: zero loss only if both sides use the same tokens."""
    torch.manual_seed(1)
    f_s = torch.randn(4, 6, 8, dtype=torch.float64)
    isometry = torch.linalg.qr(torch.randn(20, 8, dtype=torch.float64)).Q.T  # [8, 20], orthonormal rows
    f_t = 3.0 * f_s @ isometry  # scale is removed by the normalisation
    losses = manifold_losses(f_s, f_t, k=10, generator=torch.Generator().manual_seed(0))
    for name, value in losses.items():
        assert value.item() == pytest.approx(0.0, abs=1e-24), name


def test_gradient_reaches_student_only(features):
    f_s, f_t = (f.clone().requires_grad_() for f in features)
    losses = manifold_losses(f_s, f_t, k=6)
    sum(losses.values()).backward()
    assert f_t.grad is None
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0


def test_float32_under_bfloat16_autocast(features):
    f_s, f_t = (f.bfloat16() for f in features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = manifold_losses(f_s, f_t, 9, generator=torch.Generator().manual_seed(5))
    exact = manifold_losses(f_s.float(), f_t.float(), 9, generator=torch.Generator().manual_seed(5))
    for name, value in mixed.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(exact[name].item(), rel=1e-6), name


@pytest.mark.parametrize(
    "f_s, f_t, k, message",
    [
        (torch.randn(2, 5, 4), torch.randn(3, 5, 4), 2, "same batch size"),
        (torch.randn(2, 5, 4), torch.randn(2, 6, 4), 2, "same batch size and token count"),
        (torch.randn(2, 5), torch.randn(2, 5, 4), 2, "f_s must be a 3-D tensor"),
        (torch.randn(2, 5, 4), torch.ones(2, 5, 4, dtype=torch.long), 2, "f_t must be a floating-point"),
        (torch.randn(2, 5, 4), torch.randn(2, 5, 4), 0, "k must be an integer >= 1"),
        (torch.randn(2, 5, 4), torch.randn(2, 5, 4), 2.0, "k must be an integer >= 1"),
    ],
)
def test_manifold_losses_rejects_bad_inputs(f_s, f_t, k, message):
    with pytest.raises(ValueError, match=message):
        manifold_losses(f_s, f_t, k)


# ---------------------------------------------------------------- distillation_loss


def hand_cross_entropy(logits, target):
    log_probs = logits.double().log_softmax(-1)
    if target.dim() == 1:
        return -sum(float(log_probs[b, target[b]]) for b in range(len(target))) / len(target)
    return float(-(target.double() * log_probs).sum()) / len(target)


def hand_soft_kd(student, teacher, tau):
    log_p_s = (student.double() / tau).log_softmax(-1)
    p_t = (teacher.double() / tau).softmax(-1)
    return float((p_t * (p_t.log() - log_p_s)).sum()) / len(student) * tau**2


@pytest.fixture
def batch():
    torch.manual_seed(2)
    student_feats = [torch.randn(4, 6, 8), torch.randn(4, 6, 8)]
    teacher_feats = [torch.randn(4, 6, 16), torch.randn(4, 6, 16)]
    return {
        "student_logits": 2 * torch.randn(4, 5),
        "teacher_logits": 2 * torch.randn(4, 5),
        "target": torch.tensor([0, 3, 1, 4]),
        "student_feats": student_feats,
        "teacher_feats": teacher_feats,
    }


def hand_manifold(batch, seed, k, weights):
    """Per-layer reference relations, with indices drawn from one generator layer after layer."""
    generator = torch.Generator().manual_seed(seed)
    per_layer = []
    for f_s, f_t in zip(batch["student_feats"], batch["teacher_feats"]):
        picked = torch.randperm(f_s.shape[0] * f_s.shape[1], generator=generator)[:k]
        per_layer.append(reference_losses(f_s, f_t, picked))
    mean = {name: sum(layer[name] for layer in per_layer) / len(per_layer) for name in weights}
    return mean, sum(weights[name] * mean[name] for name in weights)


@pytest.mark.parametrize("kd, tau", [("soft", 1.0), ("soft", 4.0), ("hard", 1.0)])
def test_distillation_loss_is_the_weighted_sum(batch, kd, tau):
    alpha, beta, weights, k = 0.3, 2.5, {"sample": 0.1, "patch": 4.0, "rand": 0.2}, 10
    total, parts = distillation_loss(
        **batch, alpha=alpha, beta=beta, w_sample=weights["sample"], w_patch=weights["patch"],
        w_rand=weights["rand"], k=k, tau=tau, kd=kd, generator=torch.Generator().manual_seed(7),
    )
    ce = hand_cross_entropy(batch["student_logits"], batch["target"])
    if kd == "soft":
        kd_value = hand_soft_kd(batch["student_logits"], batch["teacher_logits"], tau)
    else:
        kd_value = hand_cross_entropy(batch["student_logits"], batch["teacher_logits"].argmax(-1))
    relations, manifold = hand_manifold(batch, 7, k, weights)

    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd_value, rel=1e-5)
    for name in ("patch", "sample", "rand"):
        assert parts[name].item() == pytest.approx(relations[name], rel=1e-5)
    assert parts["manifold"].item() == pytest.approx(manifold, rel=1e-5)
    assert total.item() == pytest.approx((1 - alpha) * ce + alpha * kd_value + beta * manifold, rel=1e-5)
    assert all(not value.requires_grad for value in parts.values())


def test_soft_kd_temperature_scaling(batch):
    """tau^2 scaling: at high temperature KD approaches sum((s - t - mean)^2) / (2 K B) on the logits."""
    kd_at = {}
    for tau in (1.0, 100.0):
        _, parts = distillation_loss(**batch, alpha=1.0, beta=0.0, tau=tau)
        kd_at[tau] = parts["kd"].item()
    centred = lambda z: z.double() - z.double().mean(-1, keepdim=True)  # noqa: E731
    limit = float(((centred(batch["student_logits"]) - centred(batch["teacher_logits"])) ** 2).sum()) / (2 * 5 * 4)
    assert kd_at[100.0] == pytest.approx(limit, rel=1e-2)
    assert kd_at[1.0] != pytest.approx(kd_at[100.0], rel=1e-2)


def test_mixup_targets(batch):
    soft_target = torch.softmax(torch.randn(4, 5), -1)
    _, parts = distillation_loss(**{**batch, "target": soft_target}, alpha=0.0, beta=0.0)
    assert parts["ce"].item() == pytest.approx(hand_cross_entropy(batch["student_logits"], soft_target), rel=1e-5)
    _, one_hot_parts = distillation_loss(**{**batch, "target": F.one_hot(batch["target"], 5).float()})
    _, index_parts = distillation_loss(**batch)
    assert one_hot_parts["ce"].item() == pytest.approx(index_parts["ce"].item(), rel=1e-6)


def test_tuple_logits_ce_on_class_head_kd_on_distillation_head(batch):
    cls_logits, dist_logits = batch["student_logits"], torch.randn(4, 5)
    total, parts = distillation_loss(
        **{**batch, "student_logits": (cls_logits, dist_logits)}, alpha=0.5, beta=0.0, kd="hard"
    )
    ce = hand_cross_entropy(cls_logits, batch["target"])
    kd_value = hand_cross_entropy(dist_logits, batch["teacher_logits"].argmax(-1))
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd_value, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * ce + 0.5 * kd_value, rel=1e-5)


def test_no_layers_gives_zero_manifold_and_gradients_reach_student_only(batch):
    student_logits = batch["student_logits"].clone().requires_grad_()
    teacher_logits = batch["teacher_logits"].clone().requires_grad_()
    total, parts = distillation_loss(
        student_logits, teacher_logits, batch["target"], [], [], alpha=0.5, beta=1.0
    )
    total.backward()
    assert parts["manifold"].item() == 0.0
    assert teacher_logits.grad is None and student_logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"beta": -1.0}, "beta must be >= 0"),
        ({"w_rand": -0.1}, "w_rand must be >= 0"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"kd": "medium"}, "kd must be one of"),
        ({"teacher_feats": []}, "pair up layer by layer"),
        ({"teacher_logits": torch.randn(4, 6)}, "same shape"),
        ({"target": torch.rand(4, 6)}, "target must be class indices"),
    ],
)
def test_distillation_loss_rejects_bad_arguments(batch, overrides, message):
    arguments = {**batch, **overrides}
    with pytest.raises(ValueError, match=message):
        distillation_loss(**arguments)


# ---------------------------------------------------------------- hooks


def tiny_model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **TINY, **kwargs).eval()


def blocks_by_hand(model, images):
    """Block outputs of a timm ViT/DeiT computed step by step (the model's own forward_features order)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def test_hooks_match_forward_intermediates_for_vit():
    model = tiny_model("deit_tiny_patch16_224", depth=4)
    images = torch.randn(2, 3, 32, 32)
    with BlockFeatures(model, [3, 0, 2]) as hooked, torch.no_grad():
        model(images)
        feats = hooked.pop()
        reference = model.forward_intermediates(
            images, indices=[3, 0, 2], norm=False, output_fmt="NLC", return_prefix_tokens=True,
            intermediates_only=True,
        )
    assert hooked.num_prefix_tokens == 1
    assert [tuple(f.shape) for f in feats] == [(2, 17, 32)] * 3
    # forward_intermediates returns layers in increasing order.
    by_layer = dict(zip([0, 2, 3], reference))
    for layer, feat in zip([3, 0, 2], feats):
        patches, prefix = by_layer[layer]
        torch.testing.assert_close(patch_tokens(feat, hooked.num_prefix_tokens), patches)
        torch.testing.assert_close(feat[:, :1], prefix)
    assert all(not block._forward_hooks for block in model.blocks)


def test_hooks_on_distilled_deit_match_manual_blocks_and_keep_gradients():
    model = tiny_model("deit_tiny_distilled_patch16_224", depth=4)
    model.set_distilled_training(True)
    model.train()
    images = torch.randn(2, 3, 32, 32)
    hooked = BlockFeatures(model, [1, 1, 3])
    cls_logits, dist_logits = model(images)
    feats = hooked.pop()
    hooked.remove()
    model.eval()
    manual = blocks_by_hand(model, images)
    assert hooked.num_prefix_tokens == 2
    for layer, feat in zip([1, 1, 3], feats):
        torch.testing.assert_close(feat, manual[layer])
    tokens = patch_tokens(feats, hooked.num_prefix_tokens)
    assert [tuple(f.shape) for f in tokens] == [(2, 16, 32)] * 3
    tokens[0].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[3].attn.qkv.weight.grad is None


def test_hooks_on_cait_patch_blocks_only():
    model = tiny_model("cait_xxs24_224", depth=3, depth_token_only=1)
    images = torch.randn(2, 3, 32, 32)
    with BlockFeatures(model, [0, 2]) as hooked, torch.no_grad():
        model(images)
        feats = hooked.pop()
        x = model.patch_embed(images) + model.pos_embed
        manual = [x := block(x) for block in model.blocks]
    assert hooked.num_prefix_tokens == 0
    assert all(not block._forward_hooks for block in model.blocks_token_only)
    assert [tuple(f.shape) for f in patch_tokens(feats, hooked.num_prefix_tokens)] == [(2, 16, 32)] * 2
    torch.testing.assert_close(feats[0], manual[0])
    torch.testing.assert_close(feats[1], manual[2])


def test_pop_clears_and_requires_a_forward():
    model = tiny_model("deit_tiny_patch16_224", depth=2)
    with BlockFeatures(model, [1]) as hooked, torch.no_grad():
        with pytest.raises(RuntimeError, match="run a forward pass"):
            hooked.pop()
        model(torch.randn(1, 3, 32, 32))
        assert len(hooked.pop()) == 1
        with pytest.raises(RuntimeError, match=r"blocks \[1\]"):
            hooked.pop()


@pytest.mark.parametrize("layers", [[4], [-1], [0, 7], [1.0], []])
def test_bad_layer_indices(layers):
    model = tiny_model("deit_tiny_patch16_224", depth=4)
    message = "VisionTransformer with 4 blocks: valid indices are 0..3" if layers else "at least one block"
    with pytest.raises(ValueError, match=message):
        BlockFeatures(model, layers)
    assert all(not block._forward_hooks for block in model.blocks)


def test_patch_tokens_rejects_negative_count():
    with pytest.raises(ValueError, match="num_prefix_tokens must be an integer >= 0"):
        patch_tokens(torch.randn(1, 3, 2), -1)


def test_student_teacher_step_end_to_end():
    """DeiT-distilled student (width 32) learns from a CaiT teacher (width 48) through the hooks."""
    student = tiny_model("deit_tiny_distilled_patch16_224", depth=4).train()
    student.set_distilled_training(True)
    teacher = timm.create_model("cait_xxs24_224", **{**TINY, "embed_dim": 48}, depth=4, depth_token_only=1).eval()
    images, target = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])
    with BlockFeatures(student, [0, 3]) as student_blocks, BlockFeatures(teacher, [1, 3]) as teacher_blocks:
        with torch.no_grad():
            teacher_logits = teacher(images)
        student_logits = student(images)
        total, parts = distillation_loss(
            student_logits, teacher_logits, target,
            patch_tokens(student_blocks.pop(), student_blocks.num_prefix_tokens),
            patch_tokens(teacher_blocks.pop(), teacher_blocks.num_prefix_tokens),
            alpha=0.5, k=20, generator=torch.Generator().manual_seed(0),
        )
    total.backward()
    assert math.isfinite(total.item()) and parts["manifold"].item() > 0
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_layer_pairs_batched_equal_one_call_per_pair():
    """distillation_loss stacks equally shaped layer pairs into one call; same numbers as pair by pair."""
    torch.manual_seed(0)
    students = [torch.randn(3, 5, 6, dtype=torch.float64) for _ in range(3)]
    teachers = [torch.randn(3, 5, 9, dtype=torch.float64) for _ in range(3)]
    logits, teacher_logits = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _, parts = distillation_loss(logits, teacher_logits, torch.tensor([0, 1, 2]), students, teachers, k=7,
                                 generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    pairs = [manifold_losses(s, t, 7, generator=generator) for s, t in zip(students, teachers)]
    for name in ("patch", "sample", "rand"):
        expected = sum(p[name] for p in pairs) / 3
        assert torch.allclose(parts[name], expected, rtol=1e-12, atol=1e-14), name
