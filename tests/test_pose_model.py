"""ED-Pose's keypoint head: the expansion step and the keypoint refinement restated in ED-Pose's own
layout (queries first) and checked against dfx on seeded weights; the attention mask; the matching
cost and losses against direct computations; one-to-many (hybrid) matching of poses; keypoint
results of the ground truth scoring AP 1.0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfx.data.coco import quiet_coco
from dfx.data.coco_eval import evaluate_coco
from dfx.detection.keypoints import KeypointHead, keypoint_results, pose_attention_mask, pose_cost, pose_losses
from dfx.detection.matcher import HungarianMatcher, repeat_targets


def inverse_sigmoid(x, eps=1e-3):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def seeded_head(k: int, groups: int = 4, dim: int = 16, layers: int = 2) -> KeypointHead:
    torch.manual_seed(k)
    head = KeypointHead(dim, k, groups, layers, eps=1e-3)
    with torch.no_grad():  # the pose heads start at zero: give them weights that move the points
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return head


def restated_expansion(head, output, new_reference_points, class_logits):
    """ED-Pose's query expansion in its layout: output [Q, B, C], references [Q, B, 4], logits [Q, B, N]."""
    num_group, k, c = head.groups, head.num_keypoints, output.shape[-1]
    top = torch.topk(class_logits.max(-1)[0], num_group, dim=0)[1]  # [G, B]
    box_ref = torch.gather(new_reference_points, 0, top.unsqueeze(-1).repeat(1, 1, 4))
    box_out = torch.gather(output, 0, top.unsqueeze(-1).repeat(1, 1, c))
    kpt_out = box_out[:, None, :, :] + head.keypoint_embed.weight[None, :, None, :]  # [G, K, B, C]
    pose = head.pose_heads[-1] if k == 17 else head.pose_heads[0]
    xy = (inverse_sigmoid(box_ref[..., :2][:, None]) + pose(kpt_out)[..., :2]).sigmoid()
    g, _, b, _ = xy.shape
    wh = head.hw.weight.unsqueeze(0).unsqueeze(-2).repeat(g, 1, b, 1).sigmoid() * box_ref[..., 2:][:, None]
    refs = torch.cat((box_ref.unsqueeze(1), torch.cat((xy, wh), -1)), 1).flatten(0, 1)
    states = torch.cat((box_out.unsqueeze(1), kpt_out), 1).flatten(0, 1)
    return states, refs  # [G(1+K), B, ...]


@pytest.mark.parametrize("k", [17, 5])
def test_expansion_matches_a_restatement_of_ed_pose(k):
    head = seeded_head(k)
    torch.manual_seed(100 + k)
    states, boxes, logits = torch.randn(2, 30, 16), torch.rand(2, 30, 4) * 0.8 + 0.1, torch.randn(2, 30, 3)
    ours, refs, keep = head.expand(states, boxes, logits)
    theirs, their_refs = restated_expansion(head, states.transpose(0, 1), boxes.transpose(0, 1),
                                            logits.transpose(0, 1))
    assert ours.shape == (2, 4 * (1 + k), 16) and refs.shape == (2, 4 * (1 + k), 4)
    assert torch.allclose(ours, theirs.transpose(0, 1), atol=1e-6)
    assert torch.allclose(refs, their_refs.transpose(0, 1), atol=1e-6)
    # the human queries are the top-scored ones, first in each group
    assert torch.equal(keep[0], logits[0].max(-1).values.topk(4).indices)
    assert torch.equal(refs[:, 0 :: 1 + k], torch.gather(boxes, 1, keep[..., None].expand(-1, -1, 4)))
    # the expansion moves keypoint centres away from the box centre (a test that the heads are used)
    assert (refs[:, 1 : 1 + k, :2] - refs[:, :1, :2]).abs().max() > 0.01


def test_keypoint_refinement_matches_a_restatement():
    k, groups = 5, 4
    head = seeded_head(k, groups)
    box_head = torch.nn.Linear(16, 4)
    torch.manual_seed(7)
    states, refs = torch.randn(2, groups * (1 + k), 16), torch.rand(2, groups * (1 + k), 4) * 0.8 + 0.1
    boxes, points, nxt = head.refine(1, states, refs, box_head)
    # ED-Pose's human-to-keypoints update in its layout
    output, reference = states.transpose(0, 1), refs.transpose(0, 1)
    before = inverse_sigmoid(reference)
    human = (box_head(output[0 :: 1 + k]) + before[0 :: 1 + k]).sigmoid()
    index = torch.tensor([x for x in range(groups * (1 + k)) if x % (1 + k)])
    kpt = output.index_select(0, index)
    unsig = before.index_select(0, index).clone()
    unsig[..., :2] += head.pose_heads[1](kpt)[..., :2]
    unsig[..., 2:] += head.size_head(kpt)
    new_kpt = unsig.sigmoid()
    expected = torch.cat((human.unsqueeze(1), new_kpt.view(-1, k, 2, 4)), 1).flatten(0, 1)
    assert torch.allclose(nxt, expected.transpose(0, 1), atol=1e-6)
    assert torch.allclose(boxes, human.transpose(0, 1), atol=1e-6)
    assert torch.allclose(points, new_kpt.view(groups, k, 2, 4)[..., :2].permute(2, 0, 1, 3), atol=1e-6)


def test_pose_attention_mask_is_ed_poses():
    groups, k = 3, 2
    size = groups * (1 + k)
    expected = torch.zeros(size, size, dtype=torch.bool)  # ED-Pose's loops, restated
    for j in range(size):
        start, end = (j // (1 + k)) * (1 + k), (j // (1 + k) + 1) * (1 + k)
        expected[j, :start] = True
        expected[j, end:] = True
    humans = [x for x in range(size) if x % (1 + k) == 0]
    for x in humans:
        expected[x, humans] = False
    assert torch.equal(pose_attention_mask(groups, k), expected)


def direct_cost(logits, points, labels, truth, area, sigmas):
    p, t = points.shape[0], truth.shape[0]
    out = torch.zeros(p, t, dtype=torch.float64)
    for i in range(p):
        for j in range(t):
            prob = torch.sigmoid(logits[i, labels[j]]).double()
            focal = 0.25 * (1 - prob) ** 2 * -torch.log(prob + 1e-8) - 0.75 * prob ** 2 * -torch.log(1 - prob + 1e-8)
            v = (truth[j, :, 2] > 0).double()
            l1 = sum(float(v[n]) * float((points[i, n] - truth[j, n, :2]).abs().sum()) for n in range(len(v)))
            terms = [float(v[n]) * np.exp(-float(((points[i, n] - truth[j, n, :2]) ** 2).sum())
                                          / (float(area[j]) * (2 * float(sigmas[n])) ** 2 * 2)) for n in range(len(v))]
            oks = max(sum(terms) / (float(v.sum()) + 1e-6), 1e-6)
            out[i, j] = 2 * focal + 10 * l1 + 4 * (1 - oks)
    return out


def test_pose_cost_and_losses_against_direct_computations():
    torch.manual_seed(3)
    logits, points = torch.randn(6, 2), torch.rand(6, 4, 2)
    truth = torch.cat((torch.rand(3, 4, 2), torch.tensor([[2.0, 1, 0, 2]] * 3)[..., None]), -1)
    labels, area = torch.tensor([0, 1, 0]), torch.tensor([0.05, 0.1, 0.2])
    sigmas = torch.tensor([0.05, 0.07, 0.08, 0.1])
    cost = pose_cost(logits, points, labels, truth, area, sigmas)
    assert torch.allclose(cost.double(), direct_cost(logits, points, labels, truth, area, sigmas), atol=1e-5)
    losses = pose_losses(points[:3], truth, area, sigmas, num_boxes=3.0)
    # the losses are the cost's keypoint terms of the matched pairs (the diagonal), averaged
    same_class = torch.zeros(3, 2)
    direct = direct_cost(same_class, points[:3], labels, truth, area, sigmas).diagonal()
    focal = 2 * (0.25 * 0.5 ** 2 * -np.log(0.5 + 1e-8) - 0.75 * 0.5 ** 2 * -np.log(0.5 + 1e-8))
    l1 = sum(float(((points[i] - truth[i, :, :2]).abs().sum(-1) * (truth[i, :, 2] > 0)).sum()) for i in range(3))
    assert float(losses["loss_keypoints"]) == pytest.approx(l1 / 3, rel=1e-5)
    assert float(10 * losses["loss_keypoints"] + 4 * losses["loss_oks"]) == pytest.approx(
        float(direct.mean()) - focal, rel=1e-4)
    assert 0.05 < float(losses["loss_oks"]) < 1
    exact = pose_losses(truth[..., :2], truth, area, sigmas, num_boxes=3.0)
    assert float(exact["loss_keypoints"]) == 0.0 and float(exact["loss_oks"]) == pytest.approx(0.0, abs=1e-5)


def pose_target(n=2, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, k, 2, generator=g) * 0.6 + 0.2
    keypoints = torch.cat((points, torch.full((n, k, 1), 2.0)), -1)
    low, high = points.min(1).values, points.max(1).values
    boxes = torch.cat(((low + high) / 2, high - low + 0.02), -1)
    return {"labels": torch.zeros(n, dtype=torch.int64), "boxes": boxes, "keypoints": keypoints}


def test_pose_matching_one_to_one_and_one_to_many():
    target = pose_target()
    sigmas = [0.05, 0.06, 0.07, 0.08]
    queries = torch.rand(1, 10, 4, 2)
    queries[0, 7] = target["keypoints"][0, :, :2]  # query 7 is target 0's pose, query 2 target 1's
    queries[0, 2] = target["keypoints"][1, :, :2]
    outputs = {"pred_logits": torch.zeros(1, 10, 1), "pred_boxes": torch.rand(1, 10, 4) * 0.5 + 0.25,
               "pred_keypoints": queries}
    matcher = HungarianMatcher(keypoint_sigmas=sigmas)
    (query, tgt), = matcher(outputs, [target])
    assert dict(zip(tgt.tolist(), query.tolist())) == {0: 7, 1: 2}  # found by the poses, not the random boxes
    many = repeat_targets([target], 3)[0]
    assert many["keypoints"].shape == (6, 4, 3) and torch.equal(many["keypoints"][4], target["keypoints"][0])
    (query, tgt), = matcher(outputs, [target], repeat=3)
    assert len(query) == 6 and sorted((tgt % 2).tolist()) == [0, 0, 0, 1, 1, 1]
    assert {7, 2} <= set(query.tolist())


def test_ground_truth_keypoint_results_score_ap_one():
    size = (120, 160)  # h, w
    targets = [pose_target(3, 4, seed) for seed in range(3)]
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": size[1], "height": size[0]} for i in range(3)]
    annotations = []
    scale = torch.tensor([size[1], size[0]], dtype=torch.float64)
    poses = []
    for i, t in enumerate(targets):
        pixels = t["keypoints"][..., :2].double() * scale
        poses.append(pixels)
        for n in range(3):
            low, high = pixels[n].min(0).values, pixels[n].max(0).values
            flat = torch.cat((pixels[n], torch.full((4, 1), 2.0, dtype=torch.float64)), 1).flatten().tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                "bbox": [*low.tolist(), *(high - low).tolist()], "num_keypoints": 4,
                                "area": float((high - low).prod()), "keypoints": [round(v, 2) for v in flat]})
    coco = quiet_coco({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "figure", "keypoints": ["a", "b", "c", "d"], "skeleton": []}]})
    sigmas = [0.05, 0.06, 0.07, 0.08]
    results = keypoint_results([1, 2, 3], poses, [torch.ones(3)] * 3, category_id=1)
    assert json.loads(json.dumps(results))[0]["keypoints"][2::3] == [1, 1, 1, 1]
    stats = evaluate_coco(coco, results, per_class=False, iou_type="keypoints", sigmas=sigmas)
    assert stats["AP"] == pytest.approx(1.0)
    moved = keypoint_results([1, 2, 3], [p + 6 for p in poses], [torch.ones(3)] * 3, category_id=1)
    assert evaluate_coco(coco, moved, per_class=False, iou_type="keypoints", sigmas=sigmas)["AP"] < 0.9


def tiny_pose_detector(one2many=0):
    from dfx.detection.detector import DeformableDETR, DetectorConfig

    torch.manual_seed(0)
    config = DetectorConfig(num_classes=1, backbone="resnet18", pretrained=None, frozen_bn=False,
                            backbone_kwargs={"channels": [16, 32, 64, 128]}, dim=32, heads=4, encoder_layers=1,
                            decoder_layers=4, ffn_dim=64, one2one_queries=12, one2many_queries=one2many,
                            two_stage=True, box_refine=True, look_forward_twice=True, query_position="per_layer",
                            decoder_norm=True, two_stage_scoring="class_aware", encoder_loss="selected",
                            inverse_sigmoid_eps=1e-3, keypoints=4, pose_groups=3, box_layers=2)
    return DeformableDETR(config)


def test_the_detector_with_keypoints_decodes_humans_then_poses_and_trains_every_head():
    from dfx.detection.criterion import SetCriterion

    model = tiny_pose_detector(one2many=24)
    targets = [pose_target(2, 4, seed) for seed in range(2)]
    out = model(torch.randn(2, 3, 64, 96), targets=targets)
    assert out["pred_keypoints"].shape == (2, 3, 4, 2) and out["pred_logits"].shape == (2, 3, 1)
    # two human layers (12 queries, no keypoints), then a keypoint layer (3 poses) before the last
    assert [tuple(a["pred_logits"].shape[:2]) for a in out["aux_outputs"]] == [(2, 12), (2, 12), (2, 3)]
    assert ["pred_keypoints" in a for a in out["aux_outputs"]] == [False, False, True]
    assert out["one2many"]["pred_keypoints"].shape == (2, 6, 4, 2)  # 3 * 24 // 12 hybrid pose groups
    criterion = SetCriterion(1, one2many_k=2, keypoint_sigmas=[0.05, 0.06, 0.07, 0.08])
    loss, logs = criterion(out, targets)
    assert logs["loss_keypoints"] > 0 and logs["loss_oks"] > 0 and logs["one2many"] > 0
    loss.backward()
    head = model.keypoint_head
    assert head.keypoint_embed.weight.grad.abs().sum() > 0
    assert all(h.layers[-1].weight.grad.abs().sum() > 0 for h in head.pose_heads)
    model.eval()
    with torch.no_grad():
        inference = model(torch.randn(1, 3, 64, 96))
    assert "one2many" not in inference and inference["pred_keypoints"].shape == (1, 3, 4, 2)


def test_keypoints_need_dinos_decoder():
    from dfx.detection.detector import DetectorConfig

    with pytest.raises(ValueError, match="ED-Pose is a DINO"):
        DetectorConfig(num_classes=1, keypoints=17).validate()
    with pytest.raises(ValueError, match="pose_groups"):
        DetectorConfig(num_classes=1, keypoints=17, two_stage=True, box_refine=True, query_position="per_layer",
                       one2one_queries=50, pose_groups=100).validate()


def test_the_pose_masks_of_two_query_groups_are_blind_to_each_other():
    mask = pose_attention_mask([2, 1], 1)  # groups of 2 queries: h0 k0 h1 k1 | h2 k2
    assert torch.equal(mask[:4, :4], pose_attention_mask(2, 1)) and torch.equal(mask[4:, 4:], pose_attention_mask(1, 1))
    assert mask[:4, 4:].all() and mask[4:, :4].all()  # not even the human queries see across
