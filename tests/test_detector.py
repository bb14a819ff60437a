"""The Deformable-DETR / H-DETR model and its losses on tiny CPU configurations."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from dfx.detection import DeformableDETR, DetectorConfig, HungarianMatcher, SetCriterion, postprocess, repeat_targets
from dfx.detection.transformer import DecoderLayer, group_attention_mask

TINY = dict(num_classes=3, backbone="resnet10t", frozen_bn=False, dim=32, heads=4, levels=4, points=2,
            encoder_layers=1, decoder_layers=2, ffn_dim=64, dropout=0.0, one2one_queries=5)
PAPER_SWITCHES = dict(two_stage=True, box_refine=True, mixed_query_selection=True, look_forward_twice=True)


def build(seed=0, **overrides) -> DeformableDETR:
    torch.manual_seed(seed)
    return DeformableDETR(DetectorConfig(**{**TINY, **overrides}))


def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 80, generator=generator)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 48:, :] = True  # the second image is 48x80, padded
    mask[1, :, 64:] = True
    return images, mask


TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def copy_into(source: DeformableDETR, target: DeformableDETR) -> None:
    """Load ``source``'s weights into ``target``, slicing the query tables to the target's size."""
    state = target.state_dict()
    for name, value in source.state_dict().items():
        state[name] = value[: state[name].shape[0]] if name.startswith(("query_embed", "content_queries")) else value
    target.load_state_dict(state)


def test_group_mask_blocks_exactly_the_cross_group_pairs():
    mask = group_attention_mask([2, 3])
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert torch.equal(mask, expected.bool())


def test_grouped_self_attention_equals_the_masked_one():
    torch.manual_seed(0)
    layer = DecoderLayer(dim=16, heads=2, levels=1, points=1, ffn_dim=32, dropout=0.0)
    tgt, pos = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    grouped = layer._self_attention(tgt, pos, [3, 4], mask=None)
    masked = layer._self_attention(tgt, pos, [3, 4], mask=group_attention_mask([3, 4]))
    assert torch.allclose(grouped, masked, atol=1e-6)
    # and the groups really are independent: changing group 2 leaves group 1's output alone
    changed = tgt.clone()
    changed[:, 3:] += 1.0
    again = layer._self_attention(changed, pos, [3, 4], mask=group_attention_mask([3, 4]))
    assert torch.allclose(again[:, :3], masked[:, :3], atol=1e-6) and not torch.allclose(again[:, 3:], masked[:, 3:])


@pytest.mark.parametrize("switches", [{}, PAPER_SWITCHES, dict(two_stage=True, box_refine=True)])
def test_hybrid_one2one_group_equals_the_baseline(switches):
    """Training-mode one-to-one outputs and eval outputs of H-DETR are those of Deformable-DETR with
    the same weights: the one-to-many queries change nothing but their own predictions."""
    images, mask = batch()
    hybrid = build(**switches, one2many_queries=12)
    baseline = build(seed=5, **switches, one2many_queries=0)
    copy_into(hybrid, baseline)
    for mode in ("train", "eval"):
        hybrid.train(mode == "train")
        baseline.train(mode == "train")
        got, want = hybrid(images, mask), baseline(images, mask)
        assert ("one2many" in got) == (mode == "train") and "one2many" not in want
        for key in ("pred_logits", "pred_boxes"):
            assert torch.allclose(got[key], want[key], atol=1e-5), (mode, key)
        for a, b in zip(got["aux_outputs"], want["aux_outputs"]):
            assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)
    if switches:  # two-stage: the encoder proposals are computed once, whatever the groups
        assert torch.allclose(got["enc_outputs"]["pred_logits"], want["enc_outputs"]["pred_logits"], atol=1e-5)


def test_inference_ignores_the_one2many_queries():
    images, mask = batch()
    model = build(one2many_queries=12).eval()
    before = model(images, mask)
    with torch.no_grad():
        model.query_embed.weight[5:] += torch.randn_like(model.query_embed.weight[5:])
    after = model(images, mask)
    assert torch.equal(before["pred_logits"], after["pred_logits"])
    assert torch.equal(before["pred_boxes"], after["pred_boxes"])
    assert before["pred_logits"].shape == (2, 5, 3)
    model.train()
    assert model(images, mask)["one2many"]["pred_logits"].shape == (2, 12, 3)


def test_masked_and_grouped_models_agree():
    images, mask = batch()
    grouped = build(**PAPER_SWITCHES, one2many_queries=12, hybrid_attention="grouped")
    masked = build(**PAPER_SWITCHES, one2many_queries=12, hybrid_attention="masked")
    masked.load_state_dict(grouped.state_dict())
    a, b = grouped(images, mask), masked(images, mask)
    assert torch.allclose(a["one2many"]["pred_boxes"], b["one2many"]["pred_boxes"], atol=1e-5)
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)


def _direct_terms(logits, boxes, targets, num_boxes, alpha=0.25, gamma=2.0):
    """Brute force: the cheapest assignment by enumeration, then the three losses written out."""
    matcher = HungarianMatcher()
    total = {"class": 0.0, "l1": 0.0, "giou": 0.0}
    for image, target in enumerate(targets):
        cost = matcher.cost_matrix(logits[image], boxes[image], target["labels"], target["boxes"])
        n = len(target["labels"])
        best = min(itertools.permutations(range(logits.shape[1]), n),
                   key=lambda queries: sum(float(cost[q, j]) for j, q in enumerate(queries)))
        onehot = torch.zeros_like(logits[image])
        for j, q in enumerate(best):
            onehot[q, target["labels"][j]] = 1
            pred, true = boxes[image, q], target["boxes"][j]
            total["l1"] += float((pred - true).abs().sum())
            giou = generalized_box_iou(box_convert(pred[None], "cxcywh", "xyxy"), box_convert(true[None], "cxcywh", "xyxy"))
            total["giou"] += float(1 - giou[0, 0])
        total["class"] += float(sigmoid_focal_loss(logits[image], onehot, alpha, gamma, reduction="sum"))
    return {k: v / num_boxes for k, v in total.items()}


def test_one2many_loss_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(3)
    k, queries = 2, 6
    logits = torch.randn(2, queries, 3, generator=generator)
    boxes = torch.rand(2, queries, 4, generator=generator) * 0.5 + 0.25
    criterion = SetCriterion(3, one2many_k=k, one2many_weight=0.7)
    one2one = {"pred_logits": torch.randn(2, 4, 3, generator=generator),
               "pred_boxes": torch.rand(2, 4, 4, generator=generator) * 0.5 + 0.25, "aux_outputs": []}
    outputs = {**one2one, "one2many": {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}}
    total, logs = criterion(outputs, TARGETS)
    weights = {"class": 2.0, "l1": 5.0, "giou": 2.0}
    many = _direct_terms(logits, boxes, repeat_targets(TARGETS, k), num_boxes=3 * k)
    one = _direct_terms(one2one["pred_logits"], one2one["pred_boxes"], TARGETS, num_boxes=3)
    expected_many = sum(weights[n] * v for n, v in many.items())
    expected_one = sum(weights[n] * v for n, v in one.items())
    assert logs["one2many"] == pytest.approx(expected_many, rel=1e-5)
    assert float(total) == pytest.approx(expected_one + 0.7 * expected_many, rel=1e-5)


def test_repeated_cost_matching_equals_matching_repeated_targets():
    generator = torch.Generator().manual_seed(4)
    outputs = {"pred_logits": torch.randn(2, 9, 3, generator=generator),
               "pred_boxes": torch.rand(2, 9, 4, generator=generator) * 0.5 + 0.25}
    matcher = HungarianMatcher()
    tiled = matcher(outputs, TARGETS, repeat=3)
    explicit = matcher(outputs, repeat_targets(TARGETS, 3))
    repeated = repeat_targets(TARGETS, 3)
    for image, ((q1, t1), (q2, t2)) in enumerate(zip(tiled, explicit)):
        cost = matcher.cost_matrix(outputs["pred_logits"][image], outputs["pred_boxes"][image],
                                   repeated[image]["labels"], repeated[image]["boxes"])
        assert len(q1) == 3 * len(TARGETS[image]["labels"])
        assert float(cost[q1, t1].sum()) == pytest.approx(float(cost[q2, t2].sum()), rel=1e-6)


def test_encoder_and_aux_terms_are_all_counted():
    images, mask = batch()
    model = build(**PAPER_SWITCHES, one2many_queries=12)
    outputs = model(images, mask)
    criterion = SetCriterion(3, one2many_k=2)
    total, logs = criterion(outputs, TARGETS)
    assert float(total.detach()) == pytest.approx(logs["one2one"] + logs["enc"] + logs["one2many"], rel=1e-5)
    # 64x80 inputs, not padded further (a CNN backbone needs no padding): levels 8x10, 4x5, 2x3, 1x2
    assert outputs["enc_outputs"]["pred_logits"].shape[1] == sum(h * w for h, w in [(8, 10), (4, 5), (2, 3), (1, 2)])
    total.backward()
    assert model.backbone.body.conv1[0].weight.grad.abs().sum() > 0
    assert model.enc_class_head.weight.grad.abs().sum() > 0 and model.content_queries.weight.grad[5:].abs().sum() > 0


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_reaches_exactly_one_box_head_back(look_forward_twice):
    """Reference: layer l's box is built on layer l-1's refined box, itself built on a detached
    reference, so layer l's box loss trains box heads l and l-1 only (three layers to see it)."""
    images, mask = batch()
    for layer in range(3):
        model = build(two_stage=True, box_refine=True, look_forward_twice=look_forward_twice, decoder_layers=3)
        outputs = model(images, mask)
        boxes = [*[aux["pred_boxes"] for aux in outputs["aux_outputs"]], outputs["pred_boxes"]][layer]
        boxes.sum().backward()
        grads = [head.layers[-1].weight.grad for head in model.box_heads]
        reached = [g is not None and float(g.abs().sum()) > 0 for g in grads]
        expected = [i == layer or (look_forward_twice and i == layer - 1) for i in range(3)]
        assert reached == expected, (layer, reached)


def test_two_stage_scoring_is_objectness_or_best_class():
    """agnostic: a one-logit encoder head trained with every target relabelled to class 0;
    class_aware: one logit per class."""
    images, mask = batch()
    agnostic = build(**PAPER_SWITCHES)
    aware = build(**PAPER_SWITCHES, two_stage_scoring="class_aware")
    assert agnostic.enc_class_head.out_features == 1 and aware.enc_class_head.out_features == 3
    outputs = agnostic(images, mask)
    criterion = SetCriterion(3)
    _, logs = criterion(outputs, TARGETS)
    relabelled = [{**t, "labels": torch.zeros_like(t["labels"])} for t in TARGETS]
    expected = criterion.weighted(criterion.terms(outputs["enc_outputs"], relabelled, 3.0))
    assert logs["enc"] == pytest.approx(float(expected.detach()), rel=1e-6)
    with pytest.raises(ValueError, match="two_stage_scoring"):
        build(**PAPER_SWITCHES, two_stage_scoring="dino")


def test_invalid_proposals_are_ranked_with_their_constant_score():
    """As in the reference, padded and border tokens stay in the ranking (zeroed memory, so one
    constant score) and, when selected, give the box sigmoid(inf) = 1."""
    images, mask = batch()
    model = build(two_stage=True, box_refine=True, one2one_queries=20)
    c = model.config.dim
    direction = torch.randn(c, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # zeroed memory maps to LayerNorm(direction): make that the best objectness
        model.enc_output.bias.copy_(direction)
        model.enc_output_norm.weight.fill_(1.0), model.enc_output_norm.bias.zero_()
        model.enc_class_head.weight.copy_((direction - direction.mean())[None])
    captured = {}
    model.decoder.register_forward_pre_hook(lambda module, args: captured.update(reference=args[2]))
    outputs = model(images, mask)
    logits, boxes = outputs["enc_outputs"]["pred_logits"], outputs["enc_outputs"]["pred_boxes"]
    top = logits[..., 0].topk(20, dim=1).indices
    expected = torch.gather(boxes, 1, top[..., None].expand(-1, -1, 4))
    assert torch.allclose(captured["reference"], expected)
    assert (captured["reference"][1] == 1.0).all(-1).sum() >= 10  # the padded image's invalid tokens won


def test_query_selection_projects_to_both_halves():
    """Mixed selection keeps the positional half of a 2C -> 2C projection (the reference's layer)."""
    model = build(**PAPER_SWITCHES)
    assert tuple(model.pos_trans.weight.shape) == (64, 64) and tuple(model.pos_trans_norm.weight.shape) == (64,)


def test_transformer_weights_start_xavier_and_the_stem_can_be_frozen():
    model = build(**PAPER_SWITCHES, backbone_frozen_stages=1)
    bound = lambda w: (6 / sum(w.shape[:2])) ** 0.5  # noqa: E731 - xavier_uniform's bound
    for weight in (model.encoder.layers[0].ffn[0].weight, model.decoder.layers[0].self_attn.out_proj.weight,
                   model.enc_output.weight, model.pos_trans.weight):
        # torch's default Linear init stays within 1/sqrt(fan_in), well below the xavier bound here
        assert 0.9 * bound(weight) < float(weight.detach().abs().max()) <= bound(weight)
    frozen = {name.split(".")[2] for name, p in model.named_parameters() if name.startswith("backbone.")
              and not p.requires_grad}
    trained = {name.split(".")[2] for name, p in model.named_parameters() if name.startswith("backbone.")
               and p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"} and trained == {"layer2", "layer3", "layer4"}
    # every layer's heads start as copies of one head, the encoder's class head as its first row
    heads = [model.class_heads[0], *model.class_heads[1:]]
    assert all(torch.equal(h.weight, heads[0].weight) for h in heads)
    assert all(torch.equal(h.layers[0].weight, model.enc_box_head.layers[0].weight) for h in model.box_heads)
    assert torch.equal(model.enc_class_head.weight, heads[0].weight[:1])


def test_a_cnn_sees_the_batch_padded_only_to_its_largest_image():
    """70x100: the reference's maps are 9x13, 5x7, 3x4 and 2x2 (not those of 96x128)."""
    model = build(**PAPER_SWITCHES).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 70, 100))
    assert outputs["enc_outputs"]["pred_logits"].shape[1] == 9 * 13 + 5 * 7 + 3 * 4 + 2 * 2


def test_postprocess_takes_the_top_query_class_pairs():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 0], logits[0, 2, 1], logits[0, 1, 1] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.75, 0.25, 0.5, 0.5]]])
    (result,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), detections=2)
    assert result["labels"].tolist() == [0, 1]
    assert torch.allclose(result["scores"], torch.sigmoid(torch.tensor([3.0, 2.0])))
    assert torch.allclose(result["boxes"], torch.tensor([[0.0, 0.0, 100.0, 100.0], [100.0, 0.0, 200.0, 50.0]]))


def test_bad_switch_combinations_are_named():
    with pytest.raises(ValueError, match="two_stage"):
        build(mixed_query_selection=True)
    with pytest.raises(ValueError, match="box_refine"):
        build(look_forward_twice=True)
    with pytest.raises(ValueError, match="hybrid_attention"):
        build(hybrid_attention="sparse")


def test_any_input_size_and_a_swin_backbone():
    """Inputs are padded to the backbone's largest stride; Swin runs at sizes other than 224."""
    model = build(backbone="swin_tiny_patch4_window7_224").eval()
    images = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        outputs = model(images)
    assert outputs["pred_boxes"].shape == (1, 5, 4) and torch.isfinite(outputs["pred_boxes"]).all()
    assert model.backbone.channels == [192, 384, 768] and model.backbone.strides == [8, 16, 32]


def test_flops_are_countable_in_eval_mode():
    """`dfx bench` counts FLOPs with module hooks, which reject parameter views made under no_grad."""
    from dfx.measure import count_flops

    for switches in ({}, PAPER_SWITCHES):
        model = build(**switches, one2many_queries=12).eval()
        assert count_flops(model, torch.randn(1, 3, 96, 96)) > 1e6
