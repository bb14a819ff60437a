"""Hungarian matching between DETR queries and ground-truth objects.

Shapes: ``B`` images, ``Q`` queries, ``K`` classes, ``n_i`` targets in image ``i``.

- ``HungarianMatcher`` finds, per image, the one-to-one assignment of queries to targets with the
  minimum total cost (``scipy.optimize.linear_sum_assignment``). The cost is

      cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy))

  with Deformable-DETR's focal classification cost (the detector is trained with sigmoid focal
  loss): for ``p = sigmoid(logit)`` at the target's class,
  ``C_class = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``.
- ``repeat_targets`` builds H-DETR's one-to-many targets: every object repeated ``k`` times, so
  the same matcher assigns each ground-truth box to ``k`` distinct queries.
"""

import math

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

# Keeps log() finite when a probability saturates at exactly 0 or 1.
_LOG_EPS = 1e-8


def _check_finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values; matching needs finite numbers")


def _check_targets(targets, batch_size: int, num_classes: int) -> None:
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        got = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(f"targets must be a list of {batch_size} dicts (one per image), got {got}")
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or "labels" not in target or "boxes" not in target:
            got = sorted(target) if isinstance(target, dict) else type(target).__name__
            raise ValueError(f"targets[{i}] must be a dict with 'labels' and 'boxes', got {got}")
        labels, boxes = target["labels"], target["boxes"]
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"targets[{i}]['labels'] must be an integer tensor [n], got {labels.dtype} "
                f"of shape {tuple(labels.shape)}"
            )
        if boxes.shape != (labels.shape[0], 4):
            raise ValueError(
                f"targets[{i}]['boxes'] must have shape [{labels.shape[0]}, 4] (cxcywh), "
                f"got {tuple(boxes.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must lie in [0, {num_classes - 1}], "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        _check_finite(f"targets[{i}]['boxes']", boxes)


def _check_weight(name: str, value: float, upper: float = math.inf) -> float:
    value = float(value)
    if not (0.0 <= value <= upper):
        raise ValueError(f"{name} must lie in [0, {upper}], got {value}")
    return value


class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one assignment of predictions to targets (no gradients).

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 distance between cxcywh boxes.
        cost_giou: weight of the negative generalised IoU between xyxy boxes.
        focal_alpha: focal cost alpha, in [0, 1].
        focal_gamma: focal cost gamma, >= 0.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class = _check_weight("cost_class", cost_class)
        self.cost_bbox = _check_weight("cost_bbox", cost_bbox)
        self.cost_giou = _check_weight("cost_giou", cost_giou)
        if self.cost_class == self.cost_bbox == self.cost_giou == 0.0:
            raise ValueError("cost_class, cost_bbox and cost_giou cannot all be 0")
        self.focal_alpha = _check_weight("focal_alpha", focal_alpha, upper=1.0)
        self.focal_gamma = _check_weight("focal_gamma", focal_gamma)

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """Pairwise matching cost.

        Args:
            logits: [P, K] class logits of P predictions.
            boxes: [P, 4] predicted boxes, cxcywh normalised.
            labels: [T] target classes.
            target_boxes: [T, 4] target boxes, cxcywh normalised.
        Returns:
            [P, T] cost of assigning each prediction to each target.
        """
        prob = logits.sigmoid()[:, labels]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        # Focal cost: the loss of calling the query positive for this class minus the loss of
        # calling it negative, so a confident correct query is cheap and an unsure one is not.
        positive = alpha * (1 - prob) ** gamma * -(prob + _LOG_EPS).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + _LOG_EPS).log()
        class_cost = positive - negative
        l1_cost = torch.cdist(boxes, target_boxes, p=1)
        giou = generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        )
        return self.cost_class * class_cost + self.cost_bbox * l1_cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list, repeat: int = 1) -> list:
        """Match each image's queries to its targets.

        Args:
            outputs: {"pred_logits": [B, Q, K], "pred_boxes": [B, Q, 4] cxcywh normalised}.
            targets: B dicts {"labels": [n_i] long, "boxes": [n_i, 4] cxcywh normalised}.
            repeat: match against every target repeated this many times, as ``repeat_targets(targets,
                repeat)`` would (H-DETR's one-to-many matching), with target indices into that
                repeated list; the cost is computed once per distinct target and tiled.
        Returns:
            B pairs (query_idx, target_idx), each an int64 CPU tensor of length min(Q, n_i);
            query_idx is sorted ascending, query_idx[j] is matched to target target_idx[j].
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3:
            raise ValueError(f"pred_logits must have shape [B, Q, K], got {tuple(logits.shape)}")
        batch_size, num_queries, num_classes = logits.shape
        if boxes.shape != (batch_size, num_queries, 4):
            raise ValueError(
                f"pred_boxes must have shape [{batch_size}, {num_queries}, 4] (cxcywh), "
                f"got {tuple(boxes.shape)}"
            )
        _check_finite("pred_logits", logits)
        _check_finite("pred_boxes", boxes)
        _check_targets(targets, batch_size, num_classes)

        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be an integer >= 1, got {repeat!r}")
        sizes = [len(target["labels"]) for target in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in sizes]

        # One cost matrix for the whole batch (all queries x all targets), then per-image
        # blocks: far fewer kernel launches than B small matrices.
        labels = torch.cat([target["labels"] for target in targets]).to(logits.device)
        target_boxes = torch.cat([target["boxes"] for target in targets]).to(boxes)
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, target_boxes)
        # scipy has no half types; float64 inputs keep their precision.
        cost = cost.to("cpu", torch.promote_types(cost.dtype, torch.float32))
        cost = cost.view(batch_size, num_queries, -1)

        indices = []
        for image, block in enumerate(cost.split(sizes, dim=-1)):
            costs = block[image]
            if repeat > 1:  # columns t0..tn, t0..tn, ...: the layout of repeat_targets
                costs = costs.repeat(1, repeat)
            query_idx, target_idx = linear_sum_assignment(costs.numpy())
            indices.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        return indices


def repeat_targets(targets: list, k: int) -> list:
    """H-DETR one-to-many targets: each image's objects repeated ``k`` times.

    Args:
        targets: dicts {"labels": [n], "boxes": [n, 4], ...}.
        k: repetitions, >= 1.
    Returns:
        New dicts with "labels" [k*n] and "boxes" [k*n, 4] ordered t0, t1, ..., t0, t1, ...
        (object j sits at rows j, j + n, ...); other keys are shared with the input.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return [
        {**target, "labels": target["labels"].repeat(k), "boxes": target["boxes"].repeat(k, 1)}
        for target in targets
    ]
