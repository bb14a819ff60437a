"""HungarianMatcher and repeat_targets against an independent float64 cost and brute force."""

import itertools
import math

import pytest
import torch

from dfx.detection import HungarianMatcher, repeat_targets

ALPHA, GAMMA = 0.25, 2.0


def _xyxy(box):
    cx, cy, w, h = box
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(box_a, box_b):
    """Generalised IoU of two cxcywh boxes, from the definition."""
    ax0, ay0, ax1, ay1 = _xyxy(box_a)
    bx0, by0, bx1, by1 = _xyxy(box_b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(logit, pred_box, target_box, w_class=2.0, w_bbox=5.0, w_giou=2.0):
    p = 1.0 / (1.0 + math.exp(-logit))
    positive = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8)
    negative = (1 - ALPHA) * p**GAMMA * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(pred_box, target_box))
    return w_class * (positive - negative) + w_bbox * l1 - w_giou * _giou(pred_box, target_box)


def _reference_costs(logits, boxes, target, **weights):
    """[Q][n] nested list of costs for one image, in plain Python floats."""
    logits, boxes = logits.tolist(), boxes.tolist()
    labels, target_boxes = target["labels"].tolist(), target["boxes"].tolist()
    return [
        [_pair_cost(logits[q][c], boxes[q], tb, **weights) for c, tb in zip(labels, target_boxes)]
        for q in range(len(boxes))
    ]


def _brute_force_min(costs, num_targets):
    """Minimum total cost over all injective assignments of the smaller side into the larger."""
    num_queries = len(costs)
    if num_targets == 0:
        return 0.0
    if num_targets <= num_queries:
        return min(
            sum(costs[q][t] for t, q in enumerate(queries))
            for queries in itertools.permutations(range(num_queries), num_targets)
        )
    return min(
        sum(costs[q][t] for q, t in enumerate(chosen))
        for chosen in itertools.permutations(range(num_targets), num_queries)
    )


def _random_case(generator, num_queries, sizes, num_classes=4, dtype=torch.float64):
    def boxes(n):
        centres = 0.2 + 0.6 * torch.rand(n, 2, generator=generator, dtype=dtype)
        sides = 0.05 + 0.45 * torch.rand(n, 2, generator=generator, dtype=dtype)
        return torch.cat([centres, sides], dim=1)

    batch = len(sizes)
    outputs = {
        "pred_logits": 2 * torch.randn(batch, num_queries, num_classes, generator=generator, dtype=dtype),
        "pred_boxes": boxes(batch * num_queries).view(batch, num_queries, 4),
    }
    targets = [
        {"labels": torch.randint(num_classes, (n,), generator=generator), "boxes": boxes(n)} for n in sizes
    ]
    return outputs, targets


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_queries, sizes", [(7, [0, 5, 3]), (4, [5, 2, 0]), (3, [1, 5, 3]), (5, [5, 4, 1])])
def test_matches_brute_force_minimum(seed, num_queries, sizes):
    generator = torch.Generator().manual_seed(seed)
    outputs, targets = _random_case(generator, num_queries, sizes)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == len(sizes)
    for image, (query_idx, target_idx) in enumerate(indices):
        n = sizes[image]
        assert query_idx.dtype == target_idx.dtype == torch.int64
        assert query_idx.device.type == target_idx.device.type == "cpu"
        assert len(query_idx) == len(target_idx) == min(num_queries, n)
        assert torch.equal(query_idx, query_idx.sort().values)
        assert len(set(query_idx.tolist())) == len(query_idx)
        assert len(set(target_idx.tolist())) == len(target_idx)
        costs = _reference_costs(outputs["pred_logits"][image], outputs["pred_boxes"][image], targets[image])
        matched_total = sum(costs[q][t] for q, t in zip(query_idx.tolist(), target_idx.tolist()))
        assert matched_total == pytest.approx(_brute_force_min(costs, n), abs=1e-9)


def test_float32_predictions_reach_the_minimum():
    generator = torch.Generator().manual_seed(7)
    outputs, targets = _random_case(generator, 6, [4, 2, 6], dtype=torch.float32)
    outputs["pred_logits"].requires_grad_(True)
    for image, (query_idx, target_idx) in enumerate(HungarianMatcher()(outputs, targets)):
        costs = _reference_costs(outputs["pred_logits"][image].detach(), outputs["pred_boxes"][image], targets[image])
        matched_total = sum(costs[q][t] for q, t in zip(query_idx.tolist(), target_idx.tolist()))
        assert matched_total == pytest.approx(_brute_force_min(costs, len(targets[image]["labels"])), abs=1e-4)


def test_giou_weight_changes_the_assignment():
    # Query 0 is centred on the target but twice its size (L1 0.4, GIoU 0.25); query 1 has the right
    # size but is shifted off it (L1 0.25, GIoU -1/9). L1 prefers query 1, GIoU prefers query 0.
    outputs = {
        "pred_logits": torch.zeros(1, 2, 1, dtype=torch.float64),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.75, 0.5, 0.2, 0.2]]], dtype=torch.float64),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)}]
    costs = _reference_costs(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0])
    assert costs[1][0] < costs[0][0]  # the default weights pick query 1
    (query_idx, target_idx), = HungarianMatcher()(outputs, targets)
    assert query_idx.tolist() == [1] and target_idx.tolist() == [0]
    (query_idx, _), = HungarianMatcher(cost_giou=10.0)(outputs, targets)
    assert query_idx.tolist() == [0]
    (query_idx, _), = HungarianMatcher(cost_bbox=0.0)(outputs, targets)
    assert query_idx.tolist() == [0]


def test_perfect_predictions_match_their_own_queries():
    generator = torch.Generator().manual_seed(3)
    outputs, targets = _random_case(generator, 6, [4, 5])
    for image, target in enumerate(targets):
        owners = torch.randperm(6, generator=generator)[: len(target["labels"])]
        outputs["pred_logits"][image] = -10.0
        outputs["pred_logits"][image, owners, target["labels"]] = 10.0
        outputs["pred_boxes"][image, owners] = target["boxes"]
        query_idx, target_idx = HungarianMatcher()(outputs, targets)[image]
        assert torch.equal(owners[target_idx], query_idx)


def test_repeat_targets_order_counts_and_copies():
    target = {
        "labels": torch.tensor([3, 1, 4]),
        "boxes": torch.rand(3, 4),
        "image_id": 17,
    }
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    repeated, repeated_empty = repeat_targets([target, empty], 3)
    assert repeated["labels"].tolist() == [3, 1, 4, 3, 1, 4, 3, 1, 4]
    for row in range(9):
        assert torch.equal(repeated["boxes"][row], target["boxes"][row % 3])
    assert repeated["image_id"] == 17
    assert repeated is not target and target["labels"].tolist() == [3, 1, 4]
    assert repeated_empty["labels"].shape == (0,) and repeated_empty["boxes"].shape == (0, 4)
    assert repeat_targets([target], 1)[0]["labels"].tolist() == [3, 1, 4]
    for bad_k in (0, -2, 1.5):
        with pytest.raises(ValueError, match="k must"):
            repeat_targets([target], bad_k)


def test_one_to_many_gives_each_target_k_queries():
    k, num_targets = 3, 3
    generator = torch.Generator().manual_seed(11)
    outputs, targets = _random_case(generator, 12, [num_targets, num_targets])
    repeated = repeat_targets(targets, k)
    for image, (query_idx, target_idx) in enumerate(HungarianMatcher()(outputs, repeated)):
        assert len(query_idx) == k * num_targets
        assert len(set(query_idx.tolist())) == k * num_targets
        original = (target_idx % num_targets).tolist()
        assert sorted(original) == sorted(list(range(num_targets)) * k)
        # Optimal over the repeated targets: no single swap of one matched query for an unused one
        # lowers the total (a necessary condition, cheap to check without 12P9 brute force).
        costs = _reference_costs(outputs["pred_logits"][image], outputs["pred_boxes"][image], repeated[image])
        unused = set(range(12)) - set(query_idx.tolist())
        for q, t in zip(query_idx.tolist(), target_idx.tolist()):
            assert all(costs[q][t] <= costs[u][t] + 1e-9 for u in unused)


def test_bad_inputs_raise_value_error():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(generator, 4, [2, 1])
    matcher = HungarianMatcher()
    nan_logits = {**outputs, "pred_logits": outputs["pred_logits"].clone()}
    nan_logits["pred_logits"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="pred_logits"):
        matcher(nan_logits, targets)
    inf_boxes = {**outputs, "pred_boxes": outputs["pred_boxes"].clone()}
    inf_boxes["pred_boxes"][0, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="pred_boxes"):
        matcher(inf_boxes, targets)
    with pytest.raises(ValueError, match="targets"):
        matcher(outputs, targets[:1])
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\]"):
        matcher(outputs, [targets[0], {"labels": torch.tensor([4]), "boxes": targets[1]["boxes"]}])
    with pytest.raises(ValueError, match="pred_boxes must have shape"):
        matcher({**outputs, "pred_boxes": outputs["pred_boxes"][..., :3]}, targets)
    with pytest.raises(ValueError, match="cost_giou"):
        HungarianMatcher(cost_giou=-1.0)
    with pytest.raises(ValueError, match="focal_alpha"):
        HungarianMatcher(focal_alpha=1.5)


def test_no_targets_anywhere_gives_empty_pairs():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(generator, 4, [0, 0])
    for query_idx, target_idx in HungarianMatcher()(outputs, targets):
        assert query_idx.shape == target_idx.shape == (0,)
        assert query_idx.dtype == target_idx.dtype == torch.int64
