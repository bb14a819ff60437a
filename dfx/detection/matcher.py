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
- With a :class:`MaskLossConfig` and predictions carrying ``pred_masks`` (MaskDINO), each image's cost
  adds ``cost_mask * BCE + cost_dice * dice`` of its masks on shared uniform random points
  (:func:`dfx.detection.mask_loss.mask_costs`); targets then carry ``"masks"`` [n, H, W].
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from dfx.detection.loss_config import MaskLossConfig, SetLossConfig
from dfx.detection.mask_loss import mask_costs

# Keeps log() finite when a probability saturates at exactly 0 or 1.
_LOG_EPS = 1e-8


def _check_finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values; matching needs finite numbers")


def check_targets(targets, batch_size: int, num_classes: int) -> None:
    """Raise ValueError naming the first bad target (structure, label range, finite boxes).

    targets: ``batch_size`` dicts {"labels": [n_i] integer, "boxes": [n_i, 4]}. The values are
    checked with one host read for the whole batch (one device synchronisation on a GPU).
    """
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
    objects = [target for target in targets if target["labels"].numel()]
    if not objects:
        return
    bad = torch.stack([
        ((t["labels"] < 0) | (t["labels"] >= num_classes)).any() | ~torch.isfinite(t["boxes"]).all()
        for t in objects
    ])
    if not bad.any():
        return
    for i, target in enumerate(targets):  # only on failure: find the image and say what is wrong
        labels = target["labels"]
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must lie in [0, {num_classes - 1}], "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        _check_finite(f"targets[{i}]['boxes']", target["boxes"])


class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one assignment of predictions to targets (no gradients).

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 distance between cxcywh boxes.
        cost_giou: weight of the negative generalised IoU between xyxy boxes.
        focal_alpha: focal cost alpha, in [0, 1].
        focal_gamma: focal cost gamma, >= 0.
        masks: MaskDINO's mask costs and matching points; None: boxes and classes only.
        keypoint_sigmas: ED-Pose's keypoint-stage cost (dfx.detection.keypoints.pose_cost: focal class,
            keypoint L1 and 1 - OKS with these per-keypoint sigmas, box costs off) for outputs with
            "pred_keypoints" [B, Q, K, 2] and targets with "keypoints" [n, K, 3]; None: boxes.
    """

    def __init__(
        self,
        cost_class: float = SetLossConfig.cost_class,
        cost_bbox: float = SetLossConfig.cost_bbox,
        cost_giou: float = SetLossConfig.cost_giou,
        focal_alpha: float = SetLossConfig.focal_alpha,
        focal_gamma: float = SetLossConfig.focal_gamma,
        masks: MaskLossConfig | None = None,
        keypoint_sigmas=None,
    ):
        super().__init__()
        self.keypoint_sigmas = (None if keypoint_sigmas is None else
                                torch.as_tensor(keypoint_sigmas, dtype=torch.float32))
        settings = SetLossConfig(cost_class=float(cost_class), cost_bbox=float(cost_bbox), cost_giou=float(cost_giou),
                                 focal_alpha=float(focal_alpha), focal_gamma=float(focal_gamma))
        settings.validate()
        self.cost_class, self.cost_bbox, self.cost_giou = settings.cost_class, settings.cost_bbox, settings.cost_giou
        self.focal_alpha, self.focal_gamma = settings.focal_alpha, settings.focal_gamma
        if masks is not None:
            masks.validate()
        self.masks = masks

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
    def forward(self, outputs: dict, targets: list, repeat: int = 1, validate: bool = True) -> list:
        """Match each image's queries to its targets.

        Args:
            outputs: {"pred_logits": [B, Q, K], "pred_boxes": [B, Q, 4] cxcywh normalised}.
            targets: B dicts {"labels": [n_i] long, "boxes": [n_i, 4] cxcywh normalised}.
            repeat: match against every target repeated this many times, as ``repeat_targets(targets,
                repeat)`` would (H-DETR's one-to-many matching), with target indices into that
                repeated list; the cost is computed once per distinct target and tiled.
            validate: check the predictions and ``targets`` first (several host reads). A caller
                that matched the same targets before (every decoder layer of a training step) passes
                False after checking them once with :func:`check_targets`; non-finite predictions
                are then caught on the CPU copy of the cost, which adds no synchronisation.
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
        if validate:
            _check_finite("pred_logits", logits)
            _check_finite("pred_boxes", boxes)
            check_targets(targets, batch_size, num_classes)

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
        if self.keypoint_sigmas is not None and "pred_keypoints" in outputs:
            cost = self._pose_cost(outputs, targets, logits, labels)
        else:
            cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, target_boxes)
        # scipy has no half types; float64 inputs keep their precision.
        cost = cost.to("cpu", torch.promote_types(cost.dtype, torch.float32))
        if not np.isfinite(cost.numpy()).all():  # read on the host copy: no extra synchronisation
            _check_finite("pred_logits", logits)
            _check_finite("pred_boxes", boxes)
            raise ValueError("the matching cost contains NaN or inf values (degenerate boxes?)")
        cost = cost.view(batch_size, num_queries, -1)

        with_masks = self.masks is not None and "pred_masks" in outputs
        indices = []
        for image, block in enumerate(cost.split(sizes, dim=-1)):
            costs = block[image]
            if with_masks and sizes[image]:
                bce, dice = mask_costs(outputs["pred_masks"][image], targets[image]["masks"], self.masks.mask_points)
                costs = costs + (self.masks.cost_mask * bce + self.masks.cost_dice * dice).cpu().to(costs.dtype)
            if repeat > 1:  # columns t0..tn, t0..tn, ...: the layout of repeat_targets
                costs = costs.repeat(1, repeat)
            query_idx, target_idx = linear_sum_assignment(costs.numpy())
            indices.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        return indices


    def _pose_cost(self, outputs: dict, targets: list, logits: Tensor, labels: Tensor) -> Tensor:
        from dfx.detection.keypoints import pose_cost, target_area

        points = outputs["pred_keypoints"]
        truth = torch.cat([target["keypoints"] for target in targets]).to(points)
        area = torch.cat([target_area(target) for target in targets]).to(points)
        return pose_cost(logits.flatten(0, 1), points.flatten(0, 1), labels, truth, area,
                         self.keypoint_sigmas.to(points), self.focal_alpha, self.focal_gamma)


def repeat_targets(targets: list, k: int) -> list:
    """H-DETR one-to-many targets: each image's objects repeated ``k`` times.

    Args:
        targets: dicts {"labels": [n], "boxes": [n, 4], ...}.
        k: repetitions, >= 1.
    Returns:
        New dicts with "labels" [k*n] and "boxes" [k*n, 4] ordered t0, t1, ..., t0, t1, ...
        (object j sits at rows j, j + n, ...), and "keypoints" / "area_norm" likewise where present; other
        keys are shared with the input.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    repeated = []
    for target in targets:
        out = {**target, "labels": target["labels"].repeat(k), "boxes": target["boxes"].repeat(k, 1)}
        for key in ("keypoints", "area_norm"):  # pose targets repeat with their boxes
            if key in target:
                out[key] = target[key].repeat(k, *([1] * (target[key].dim() - 1)))
        repeated.append(out)
    return repeated
