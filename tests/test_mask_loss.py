"""Point-sampled mask losses and matching costs against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from dfx.detection import HungarianMatcher, SetCriterion
from dfx.detection.loss_config import MASKDINO_SET_LOSS, MaskLossConfig
from dfx.detection.mask_loss import mask_costs, mask_losses, point_sample, uncertain_points


def bilinear(grid: torch.Tensor, x: float, y: float) -> float:
    """The value at (x, y) in [0, 1]² of a map whose pixel i covers [i, i + 1) / size, zero outside."""
    height, width = grid.shape
    px, py = x * width - 0.5, y * height - 0.5  # pixel centres sit at i + 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < width and 0 <= yi < height:
                total += wx * wy * float(grid[yi, xi])
    return total


def test_point_sample_is_bilinear_reading_at_normalised_points():
    torch.manual_seed(0)
    maps = torch.randn(2, 4, 5, dtype=torch.float64)
    points = torch.rand(2, 7, 2, dtype=torch.float64)
    points[0, 0] = torch.tensor([0.0, 0.0])  # a corner: a quarter of the corner pixel, the rest outside
    points[0, 1] = torch.tensor([0.5 / 5 + 2 / 5, 0.5 / 4 + 1 / 4])  # the centre of pixel (row 1, col 2)
    sampled = point_sample(maps, points)
    expected = torch.tensor([[bilinear(m, float(x), float(y)) for x, y in p] for m, p in zip(maps, points)],
                            dtype=torch.float64)
    assert torch.allclose(sampled, expected, atol=1e-12)
    assert sampled[0, 0] == pytest.approx(0.25 * float(maps[0, 0, 0]))
    assert sampled[0, 1] == pytest.approx(float(maps[0, 1, 2]))


def test_uncertain_points_keep_the_most_uncertain_candidates_then_uniform_ones():
    logits = torch.randn(3, 6, 8)
    torch.manual_seed(5)
    chosen = uncertain_points(logits, points=20, oversample=3.0, importance=0.75)
    torch.manual_seed(5)  # the same draws, restated
    candidates = torch.rand(3, 60, 2)
    fresh = torch.rand(3, 5, 2)
    assert chosen.shape == (3, 20, 2)
    assert torch.equal(chosen[:, 15:], fresh)
    uncertainty = -point_sample(logits, candidates).abs()
    for image in range(3):
        kept = -point_sample(logits[image : image + 1], chosen[image : image + 1, :15]).abs()[0]
        # exactly the 15 highest uncertainties among the 60 candidates
        assert torch.allclose(kept.sort().values, uncertainty[image].sort().values[-15:], atol=1e-6)


def test_mask_losses_equal_the_bce_and_dice_formulas():
    torch.manual_seed(1)
    logits, targets = torch.randn(3, 8, 10) * 3, (torch.rand(3, 32, 40) > 0.5).float()
    settings = dict(points=50, oversample=3.0, importance=0.75)
    torch.manual_seed(2)
    bce, dice = mask_losses(logits, targets, 2.0, **settings)
    torch.manual_seed(2)
    points = uncertain_points(logits, **settings)
    x, t = point_sample(logits, points), point_sample(targets, points)
    p = x.sigmoid()
    expected_bce = (-(t * p.log() + (1 - t) * (1 - p).log())).mean(-1).sum() / 2.0
    expected_dice = (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).sum() / 2.0
    assert bce.item() == pytest.approx(expected_bce.item(), rel=1e-5)
    assert dice.item() == pytest.approx(expected_dice.item(), rel=1e-5)
    # a confident correct mask costs little, its inverse a lot
    target = torch.zeros(1, 16, 16)
    target[:, 4:12, 4:12] = 1
    good = (target * 2 - 1)[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2) * 20
    assert sum(mask_losses(good, target, 1.0, **settings)) < sum(mask_losses(-good, target, 1.0, **settings)) / 10


def test_mask_costs_are_the_pairwise_losses_on_shared_points():
    torch.manual_seed(3)
    logits, targets = torch.randn(4, 8, 10), (torch.rand(2, 32, 40) > 0.5).float()
    torch.manual_seed(4)
    bce, dice = mask_costs(logits, targets, 30)
    torch.manual_seed(4)
    points = torch.rand(1, 30, 2)
    x, t = point_sample(logits, points.expand(4, -1, -1)), point_sample(targets, points.expand(2, -1, -1))
    p = x.sigmoid()
    for q in range(4):
        for j in range(2):
            pair_bce = -(t[j] * p[q].log() + (1 - t[j]) * (1 - p[q]).log()).mean()
            pair_dice = 1 - (2 * (p[q] * t[j]).sum() + 1) / (p[q].sum() + t[j].sum() + 1)
            assert bce[q, j].item() == pytest.approx(pair_bce.item(), rel=1e-5)
            assert dice[q, j].item() == pytest.approx(pair_dice.item(), rel=1e-5)


def square(top: int, left: int, size: int = 8, frame: int = 32) -> torch.Tensor:
    mask = torch.zeros(frame, frame)
    mask[top : top + size, left : left + size] = 1
    return mask


def test_masks_decide_a_match_that_boxes_and_classes_leave_tied():
    """Two queries with the same class and box: the one whose mask covers the target wins."""
    logits = torch.full((1, 2, 2), -3.0)
    boxes = torch.tensor([[[0.5, 0.5, 0.25, 0.25]] * 2])
    right = square(2, 2)[::4, ::4] * 20 - 10  # stride-4 logits of the target's square
    masks = torch.stack((square(20, 20)[::4, ::4] * 20 - 10, right))[None]
    targets = [{"labels": torch.tensor([1]), "boxes": boxes[0, :1], "masks": square(2, 2)[None]}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}
    torch.manual_seed(0)
    (query, target), = HungarianMatcher(masks=MaskLossConfig(mask_points=200))(outputs, targets)
    assert query.tolist() == [1] and target.tolist() == [0]
    (query, _), = HungarianMatcher()(outputs, targets)  # boxes only: a tie, the first query
    assert query.tolist() == [0]


def test_the_criterion_adds_the_weighted_mask_terms():
    masks = MaskLossConfig(mask_points=64)
    criterion = SetCriterion.from_config(2, MASKDINO_SET_LOSS, masks=masks)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.2, 0.25, 0.25]]),
                "masks": square(2, 2)[None]}]
    base = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.tensor([[[0.2, 0.2, 0.25, 0.25]] * 3])}
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    torch.manual_seed(0)
    terms = criterion.terms({**base, "pred_masks": logits}, targets, 1.0)
    assert set(terms) == {"class", "l1", "giou", "mask", "dice"}
    torch.manual_seed(0)  # the same draws as inside terms(): the matching points, then the loss points
    (query, _), = criterion.matcher({**base, "pred_masks": logits.detach()}, targets)
    bce, dice = mask_losses(logits[0, query], targets[0]["masks"], 1.0, 64, 3.0, 0.75)
    assert terms["mask"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert terms["dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    total, logs = criterion({**base, "pred_masks": logits}, targets)
    assert logs["loss_mask"] > 0 and logs["loss_dice"] > 0
    total.backward()
    assert logits.grad.abs().sum() > 0
    assert criterion.weights == {"class": 4.0, "l1": 5.0, "giou": 2.0, "mask": 5.0, "dice": 5.0}


@pytest.mark.parametrize("field, value, message", [("mask_points", 0, "mask_points must be an integer >= 1"),
                                                   ("oversample_ratio", 0.5, "oversample_ratio must be >= 1"),
                                                   ("importance_sample_ratio", 1.5, "importance_sample_ratio"),
                                                   ("dice_weight", -1.0, "dice_weight must be >= 0")])
def test_bad_mask_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        MaskLossConfig(**{field: value}).validate()


def test_targets_without_masks_are_named():
    criterion = SetCriterion(2, masks=MaskLossConfig(mask_points=16))
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5),
               "pred_masks": torch.zeros(1, 3, 8, 8)}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] must be \[1, H, W\].*got none"):
        criterion(outputs, targets)
