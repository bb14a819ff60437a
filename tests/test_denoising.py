"""DINO's contrastive denoising: the noise, the attention mask, the fixed matching, its losses, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import box_convert, sigmoid_focal_loss

from dfx.detection import DeformableDETR, DetectorConfig, SetCriterion
from dfx.detection.denoising import (denoising_attention_mask, denoising_groups, denoising_indices, denoising_loss,
                                     noised_queries)
from dfx.errors import UsageError
from dfx.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = dict(num_classes=3, backbone="resnet10t", frozen_bn=False, dim=32, heads=4, levels=4, points=2,
            encoder_layers=1, decoder_layers=2, ffn_dim=64, dropout=0.0, one2one_queries=5, two_stage=True,
            box_refine=True, mixed_query_selection=True, look_forward_twice=True)
TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def build(seed=0, **overrides) -> DeformableDETR:
    torch.manual_seed(seed)
    return DeformableDETR(DetectorConfig(**{**TINY, **overrides}))


def images():
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))


def many_targets(objects: int, seed: int = 0) -> list[dict]:
    """One image of ``objects`` small boxes well inside the frame (so clipping never bites)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(objects, 2, generator=generator) * 0.4 + 0.3
    sizes = torch.rand(objects, 2, generator=generator) * 0.05 + 0.02
    return [{"labels": torch.randint(0, 4, (objects,), generator=generator), "boxes": torch.cat((centres, sizes), 1)}]


# --- the number of groups -------------------------------------------------------------------------

def test_groups_follow_the_budget_and_fall_back_to_one():
    """The reference doubles dn_number before dividing by 2·M: 100 gives 100 // M groups (M = 6: 16
    groups of 12 queries, 192 denoising queries), not 100 // (2·M)."""
    assert denoising_groups(100, 6) == 16 and denoising_groups(100, 3) == 33 and denoising_groups(100, 50) == 2
    assert denoising_groups(100, 101) == 1  # budget below one image's objects: one group, as in the reference
    assert denoising_groups(100, 0) == 0 and denoising_groups(0, 5) == 0
    dn = noised_queries(TARGETS, 4, 3)
    assert (dn.groups, dn.group_size, dn.size) == (2, 4, 8) and dn.boxes.shape == (2, 8, 4)
    # image 0 has 2 objects, image 1 has 1: per group [pos pos | neg neg], image 1's second slots are padding
    assert dn.present.tolist() == [[True, True, True, True] * 2, [True, False, True, False] * 2]
    assert noised_queries([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}], 100, 3) is None


def test_small_budgets_follow_each_reference():
    """IDEA-Research/DINO divides only a dn_number of 50 and more by the object count (2·dn_number
    groups below that, whatever M); detrex always divides."""
    assert denoising_groups(20, 6, "dino") == 40 and denoising_groups(49, 1, "dino") == 98
    assert denoising_groups(50, 6, "dino") == 8 == denoising_groups(50, 6) and denoising_groups(20, 6) == 3
    assert denoising_groups(20, 0, "dino") == 0 and denoising_groups(0, 3, "dino") == 0
    dn = noised_queries(TARGETS, 4, 3, group_rule="dino")
    assert (dn.groups, dn.group_size) == (8, 4)  # per_object gives 2 (the test above)
    model = build(dn_queries=4, dn_groups="dino")
    model.train()
    assert model(images(), None, TARGETS)["dn"]["groups"] == 8


def test_noise_labels_come_from_the_whole_label_book():
    """dn_label_book 7 over 4 classes: a flip draws one of 7 ids, 3 of which are no class and have
    denoising label embeddings of their own (IDEA-Research/DINO: 91 COCO ids, 80 classes)."""
    targets = many_targets(400)
    dn = noised_queries(targets, 8000, 7, label_noise=0.6, box_noise=0.0, generator=torch.Generator().manual_seed(2))
    truth = targets[0]["labels"].repeat(dn.groups * 2)
    assert float((dn.labels[0] != truth).float().mean()) == pytest.approx(0.3 * 6 / 7, abs=0.015)
    assert float((dn.labels[0] >= 4).float().mean()) == pytest.approx(0.3 * 3 / 7, abs=0.012)
    assert dn.labels.max() == 6
    model = build(dn_queries=4, dn_label_book=7)
    assert model.dn_label_embed.weight.shape == (7, 32)
    model.train()
    model.config = DetectorConfig(**{**TINY, "dn_queries": 4, "dn_label_book": 7, "label_noise": 1.0})
    assert torch.isfinite(model(images(), None, TARGETS)["pred_logits"]).all()
    with pytest.raises(ValueError, match="dn_label_book"):
        DetectorConfig(**{**TINY, "dn_queries": 4, "dn_label_book": 2}).validate()


# --- the noise ------------------------------------------------------------------------------------

def test_box_noise_stays_in_its_ranges():
    """Each corner of a positive moves by at most λ·(w/2, h/2); a negative's by between 1x and 2x that."""
    targets = many_targets(50)
    box_noise = 0.4
    dn = noised_queries(targets, 500, 4, label_noise=0.0, box_noise=box_noise,
                        generator=torch.Generator().manual_seed(0))
    assert dn.groups == 10
    truth = targets[0]["boxes"].repeat(dn.groups * 2, 1)
    moved = (box_convert(dn.boxes[0], "cxcywh", "xyxy") - box_convert(truth, "cxcywh", "xyxy")).abs()
    half = truth[:, 2:].repeat(1, 2) / 2 * box_noise
    ratio = (moved / half).view(dn.groups, 2, 50, 4)
    positives, negatives = ratio[:, 0], ratio[:, 1]
    assert positives.max() <= 1 + 1e-4 and negatives.min() >= 1 - 1e-4 and negatives.max() <= 2 + 1e-4
    assert positives.mean() == pytest.approx(0.5, abs=0.05) and negatives.mean() == pytest.approx(1.5, abs=0.05)
    # so a positive's centre moves by at most λ·w/2 and its size stays within [1 - λ, 1 + λ] of the truth
    boxes = dn.boxes[0].view(dn.groups, 2, 50, 4)[:, 0]
    scale = boxes[..., 2:] / targets[0]["boxes"][:, 2:]
    shift = (boxes[..., :2] - targets[0]["boxes"][:, :2]).abs() / targets[0]["boxes"][:, 2:]
    assert scale.min() >= 1 - box_noise - 1e-4 and scale.max() <= 1 + box_noise + 1e-4
    assert shift.max() <= box_noise / 2 + 1e-4
    assert torch.equal(dn.labels[0], targets[0]["labels"].repeat(dn.groups * 2))  # label_noise 0: untouched


def test_label_noise_flips_with_half_its_probability():
    targets = many_targets(400)
    dn = noised_queries(targets, 8000, 4, label_noise=0.6, box_noise=0.0, generator=torch.Generator().manual_seed(1))
    changed = (dn.labels[0] != targets[0]["labels"].repeat(dn.groups * 2)).float().mean()
    # flipped with probability 0.6 / 2 to a uniform class among 4 (a quarter of the flips keep the label)
    assert float(changed) == pytest.approx(0.3 * 0.75, abs=0.015)
    assert dn.labels.min() >= 0 and dn.labels.max() <= 3
    assert torch.equal(dn.boxes[0], targets[0]["boxes"].repeat(dn.groups * 2, 1))  # box_noise 0: untouched


def test_noise_is_reproducible_from_the_seed():
    def noise(seed, use_global=False):
        if use_global:
            torch.manual_seed(seed)
            return noised_queries(TARGETS, 20, 3)
        return noised_queries(TARGETS, 20, 3, generator=torch.Generator().manual_seed(seed))

    a, b, c = noise(7), noise(7), noise(8)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.boxes, c.boxes)
    assert torch.equal(noise(3, True).boxes, noise(3, True).boxes)  # the run's seed (global generator) too


# --- the attention mask ---------------------------------------------------------------------------

def test_attention_mask_blocks():
    """2 denoising groups of 2, then 3 one-to-one queries: groups see themselves (+ the matching
    queries); matching queries never see denoising ones."""
    mask = denoising_attention_mask(2, 2, [3]).int()
    expected = torch.tensor([[0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0]])
    assert torch.equal(mask, expected)
    # with H-DETR's one-to-many group (2 queries): isolated from everything, and nothing sees it
    hybrid = denoising_attention_mask(2, 2, [3, 2]).int()
    assert torch.equal(hybrid[:7, :7], expected)
    assert hybrid[7:, :7].all() and hybrid[:7, 7:].all() and not hybrid[7:, 7:].any()


@pytest.mark.parametrize("one2many", [0, 6])
def test_matching_queries_are_untouched_by_denoising(one2many):
    """Same weights with denoising on and off: identical matching outputs in training (the mask
    hides the denoising queries) and in eval (none run); only the denoising part is new."""
    x = images()
    dino = build(dn_queries=4, one2many_queries=one2many)
    plain = build(seed=3, one2many_queries=one2many)
    missing = plain.load_state_dict(dino.state_dict(), strict=False)
    assert missing.unexpected_keys == ["dn_label_embed.weight"] and not missing.missing_keys
    for mode in (True, False):
        dino.train(mode)
        plain.train(mode)
        torch.manual_seed(0)
        got = dino(x, None, TARGETS)
        want = plain(x, None, TARGETS)
        assert ("dn" in got) == mode and "dn" not in want
        for key in ("pred_logits", "pred_boxes"):
            assert torch.allclose(got[key], want[key], atol=1e-5), (mode, key)
            for a, b in zip(got["aux_outputs"], want["aux_outputs"]):
                assert torch.allclose(a[key], b[key], atol=1e-5)
            if mode and one2many:
                assert torch.allclose(got["one2many"][key], want["one2many"][key], atol=1e-5)
    dino.train()
    out = dino(x, None, TARGETS)
    assert out["dn"]["pred_logits"].shape == (2, 8, 3) and len(out["dn"]["aux_outputs"]) == 1


def test_eval_runs_no_denoising_query():
    model = build(dn_queries=4)
    seen = []
    model.decoder.layers[0].self_attn.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
    model.eval()
    with torch.no_grad():
        out = model(images(), None, TARGETS)
    assert seen == [5] and "dn" not in out and out["pred_logits"].shape == (2, 5, 3)
    model.train()
    model(images(), None, TARGETS)
    assert seen[-1] == 5 + 8  # training: 2 groups x (2 positives + 2 negatives) before the 5 queries
    model(images(), None)  # no targets (e.g. a FLOP count in training mode): no denoising
    assert seen[-1] == 5


def test_groups_never_see_each_other():
    """Changing group 1's content leaves group 0 and the matching queries unchanged."""
    model = build(dn_queries=4)
    x = images()
    dn = noised_queries(TARGETS, 4, 3, generator=torch.Generator().manual_seed(0))
    gs = dn.group_size
    content = model.dn_label_embed(dn.labels) * dn.present[..., None]
    perturbed = content.clone()
    perturbed[:, gs:] += 1.0
    reference, states = _decoder_states(model, x, dn, content), _decoder_states(model, x, dn, perturbed)
    assert torch.allclose(states[:, :gs], reference[:, :gs], atol=1e-5)
    assert not torch.allclose(states[:, gs : 2 * gs], reference[:, gs : 2 * gs], atol=1e-3)
    assert torch.allclose(states[:, 2 * gs :], reference[:, 2 * gs :], atol=1e-5)  # the matching queries


def _decoder_states(model, x, dn, dn_content):
    """Last decoder states of [denoising ; matching] queries with the given denoising content."""
    from dfx.detection.denoising import denoising_attention_mask as mask_of

    mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    maps, masks = model.input_proj(*model.backbone(x, mask))
    src, pos, flat_mask, shapes, ratios = model._flatten(maps, masks)
    memory = model.encoder(src, pos, shapes, ratios, flat_mask)
    content, query_pos, reference = model._queries(memory, flat_mask, shapes, 5, {})
    dn_pos = model._box_position(dn.boxes)[..., : model.config.dim]
    states, _ = model.decoder(torch.cat((dn_content, content), 1), torch.cat((dn_pos, query_pos), 1),
                              torch.cat((dn.boxes, reference), 1), memory, shapes, ratios, flat_mask,
                              model._box_delta, [dn.size, 5], attn_mask=mask_of(dn.groups, dn.group_size, [5]))
    return states[-1]


# --- matching and losses --------------------------------------------------------------------------

def test_positives_are_matched_to_their_objects_and_negatives_to_no_object():
    indices = denoising_indices(TARGETS, groups=2, group_size=4)
    assert [q.tolist() for q, _ in indices] == [[0, 1, 4, 5], [0, 4]]
    assert [t.tolist() for _, t in indices] == [[0, 1, 0, 1], [0, 0]]


def test_denoising_loss_matches_a_direct_computation():
    """Every decoder layer: focal over all slots with one-hot targets at the positives only (negatives
    and padding: no object), L1 and GIoU on the positives, normalised by groups x boxes."""
    from torchvision.ops import generalized_box_iou_loss

    generator = torch.Generator().manual_seed(5)
    layers = [{"pred_logits": torch.randn(2, 8, 3, generator=generator),
               "pred_boxes": torch.rand(2, 8, 4, generator=generator) * 0.5 + 0.25} for _ in range(2)]
    outputs = {**layers[-1], "aux_outputs": layers[:-1], "groups": 2, "group_size": 4}
    criterion = SetCriterion(3, class_weight=1.0)
    expected = 0.0
    for layer in layers:
        onehot = torch.zeros(2, 8, 3)
        l1 = giou = 0.0
        for image, queries in enumerate([[0, 1, 4, 5], [0, 4]]):
            for slot, query in enumerate(queries):
                obj = slot % len(TARGETS[image]["labels"])
                onehot[image, query, TARGETS[image]["labels"][obj]] = 1.0
                pred, true = layer["pred_boxes"][image, query], TARGETS[image]["boxes"][obj]
                l1 += float((pred - true).abs().sum())
                giou += float(generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"),
                                                       box_convert(true, "cxcywh", "xyxy")))
        focal = float(sigmoid_focal_loss(layer["pred_logits"], onehot, 0.25, 2.0, reduction="sum"))
        expected += (1.0 * focal + 5.0 * l1 + 2.0 * giou) / (2 * 3)
    assert float(denoising_loss(criterion, outputs, TARGETS, num_boxes=3.0)) == pytest.approx(expected, rel=1e-5)
    # and the criterion adds it (on top of the matching losses) when the model returns a "dn" part
    plain = {**layers[-1], "aux_outputs": layers[:-1]}
    with_dn = {**plain, "dn": outputs}
    total, logs = criterion(with_dn, TARGETS)
    assert float(total) == pytest.approx(float(criterion(plain, TARGETS)[0]) + expected, rel=1e-5)
    assert logs["dn"] == pytest.approx(expected, rel=1e-5) and logs["dn_groups"] == 2


def test_a_training_step_reaches_the_label_embedding_and_a_small_budget_falls_back_to_one_group():
    model = build(dn_queries=1)  # a budget below the 2 objects of image 0
    out = model(images(), None, TARGETS)
    assert out["dn"]["groups"] == 1 and out["dn"]["pred_logits"].shape == (2, 4, 3)
    total, logs = SetCriterion(3)(out, TARGETS)
    total.backward()
    assert torch.isfinite(total) and logs["dn_groups"] == 1
    grad = model.dn_label_embed.weight.grad
    assert grad[[0, 1, 2]].abs().sum() > 0
    # a batch without objects: no denoising part, yet the embedding takes part in the graph (DDP)
    model.zero_grad()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = model(images(), None, empty)
    total, logs = SetCriterion(3)(out, empty)
    total.backward()
    assert "dn" not in out and "dn" not in logs and model.dn_label_embed.weight.grad is not None


@pytest.mark.slow
def test_dino_shapes_trains_through_the_engine(tmp_path, monkeypatch):
    """The task hands the targets to the model: every training step has a denoising loss."""
    import dfx.detection.criterion as criterion_module
    from dfx.data.shapes_det import generate_shapes_det
    from dfx.engine import train

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return denoising_loss(*args, **kwargs)

    monkeypatch.setattr(criterion_module, "denoising_loss", counting)
    root = tmp_path / "shapes-det"
    generate_shapes_det(root, seed=0, train_images=4, val_images=2)
    tiny = ["model.backbone=resnet10t", "model.dim=32", "model.heads=4", "model.encoder_layers=1",
            "model.decoder_layers=2", "model.ffn_dim=64", "model.one2one_queries=10", "model.dn_queries=20",
            "data.scales=[64]", "data.max_size=64", "train.epochs=1", "train.batch_size=2", "train.num_workers=0",
            "train.warmup_steps=0", "eval.batch_size=2", "eval.draw_images=0"]
    result = train(RECIPES / "dino-shapes.yaml", [f"data.root={root}", *tiny], out=tmp_path / "run", device="cpu",
                   quiet=True)
    assert len(calls) == 2  # 4 images, batch 2
    assert 0.0 <= result["metrics"]["AP"] <= 1.0


# --- recipes and bad input ------------------------------------------------------------------------

def test_dino_recipes_hold_dinos_settings():
    dino = load_recipe(RECIPES / "dino.yaml")
    m = dino.model
    assert (m.one2one_queries, m.one2many_queries, m.dn_queries, m.label_noise, m.box_noise) == (900, 0, 100, 0.5, 1.0)
    assert m.position_temperature == 20 and m.two_stage and m.box_refine and m.mixed_query_selection
    assert m.look_forward_twice and (m.ffn_dim, m.dropout) == (2048, 0.0) and m.two_stage_scoring == "class_aware"
    assert (dino.loss.class_weight, dino.loss.bbox_weight, dino.loss.giou_weight) == (1.0, 5.0, 2.0)
    assert (dino.loss.cost_class, dino.loss.cost_bbox, dino.loss.cost_giou) == (2.0, 5.0, 2.0)
    assert (dino.train.lr, dino.train.backbone_lr, dino.train.epochs, dino.train.milestones) == (1e-4, 1e-5, 12, [11])
    shapes = load_recipe(RECIPES / "dino-shapes.yaml")
    baseline = load_recipe(RECIPES / "deformable-detr-shapes.yaml")
    assert shapes.data.root == "shapes-det" and shapes.model.dn_queries == 100 and shapes.loss.class_weight == 1.0
    assert shapes.model.two_stage_scoring == "class_aware" and baseline.model.two_stage_scoring == "agnostic"
    dino_only = {"dn_queries", "label_noise", "box_noise", "position_temperature", "two_stage_scoring",
                 "position_offset", "query_position", "decoder_norm", "encoder_loss", "shared_heads",
                 "content_query_init", "inverse_sigmoid_eps"}
    assert all(getattr(shapes.model, k) == getattr(dino.model, k) for k in dino_only)  # recipes/dino.yaml's switches
    # the shapes recipe is the shapes baseline plus DINO's switches: same size, data and schedule
    assert {k: v for k, v in vars(shapes.model).items() if k not in dino_only} == \
        {k: v for k, v in vars(baseline.model).items() if k not in dino_only}
    assert vars(shapes.train) == vars(baseline.train) and vars(shapes.data) == vars(baseline.data)


@pytest.mark.parametrize("override, key", [("model.dn_queries=-1", "dn_queries"),
                                           ("model.label_noise=1.5", "label_noise"),
                                           ("model.box_noise=-0.1", "box_noise"),
                                           ("model.position_temperature=0", "position_temperature")])
def test_bad_denoising_values_are_usage_errors(override, key):
    with pytest.raises(UsageError, match=f"model: {key}"):
        load_recipe(RECIPES / "dino-shapes.yaml", [override])
    with pytest.raises(UsageError, match="model: dn_queries.*two_stage"):
        load_recipe(RECIPES / "dino-shapes.yaml", ["model.two_stage=false", "model.mixed_query_selection=false"])
