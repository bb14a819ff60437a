"""Set-prediction losses: focal classification, L1 and GIoU boxes, and H-DETR's one-to-many term.

For one set of predictions and its Hungarian matching (``σ``), with ``N`` the number of target
boxes in the batch (at least 1)::

    L_class = Σ_{queries, classes} focal(logit, onehot of the matched label) / N
    L_l1    = Σ_matched |b - b̂|_1 / N          (cxcywh, normalised)
    L_giou  = Σ_matched (1 - GIoU(b, b̂)) / N
    L       = w_class · L_class + w_l1 · L_l1 + w_giou · L_giou

summed over the final decoder layer, every auxiliary layer, and (two-stage) the encoder proposals.
H-DETR adds the same sum over the one-to-many group, matched against every target repeated ``k``
times (``N`` becomes ``k·N``), times ``λ`` (``one2many_weight``). The encoder term is counted once;
an encoder head with one logit (class-agnostic two-stage scoring) is trained as objectness, every
target relabelled 0.
DINO adds the same sum over its denoising queries (:func:`dfx.detection.denoising.denoising_loss`).
MaskDINO (``masks``, a :class:`MaskLossConfig`) adds to every prediction that carries ``pred_masks``
``w_mask · L_mask + w_dice · L_dice``, the point-sampled BCE and dice of the matched masks over ``N``
(:func:`dfx.detection.mask_loss.mask_losses`); targets then carry ``"masks"`` [n, H, W] on the padded
batch's pixel grid.
ED-Pose (``keypoint_sigmas``: the per-keypoint OKS sigmas) adds to every prediction that carries
``pred_keypoints`` ``w_keypoints · L_keypoints + w_oks · L_oks`` (10 and 4: the visibility-weighted L1
and 1 - OKS of the matched poses over ``N``, :func:`dfx.detection.keypoints.pose_losses`), and the
matcher of such a prediction uses ED-Pose's keypoint cost; targets then carry ``"keypoints"`` [n, K, 3].
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from dfx.detection.denoising import denoising_loss
from dfx.detection.loss_config import HybridLossConfig, MaskLossConfig, SetLossConfig
from dfx.detection.mask_loss import mask_losses
from dfx.detection.matcher import HungarianMatcher, check_targets, repeat_targets


class SetCriterion(nn.Module):
    """outputs of :class:`dfx.detection.detector.DeformableDETR`, targets -> (loss, logs).

    targets: per image {"labels": [n] long, "boxes": [n, 4] cxcywh normalised}.
    logs: the weighted one-to-one terms of the last layer, ``one2one``/``one2many``/``enc`` totals.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None,
                 class_weight: float = SetLossConfig.class_weight, bbox_weight: float = SetLossConfig.bbox_weight,
                 giou_weight: float = SetLossConfig.giou_weight, focal_alpha: float = SetLossConfig.focal_alpha,
                 focal_gamma: float = SetLossConfig.focal_gamma, one2many_k: int = HybridLossConfig.one2many_k,
                 one2many_weight: float = HybridLossConfig.one2many_weight, masks: MaskLossConfig | None = None,
                 keypoint_sigmas=None):
        super().__init__()
        SetLossConfig(class_weight=class_weight, bbox_weight=bbox_weight, giou_weight=giou_weight,
                      focal_alpha=focal_alpha, focal_gamma=focal_gamma).validate()
        HybridLossConfig(one2many_k, one2many_weight).validate()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(masks=masks)
        self.weights = {"class": class_weight, "l1": bbox_weight, "giou": giou_weight}
        if masks is not None:
            masks.validate()
            self.weights.update(mask=masks.mask_weight, dice=masks.dice_weight)
        self.masks = masks
        self.keypoint_sigmas = None
        if keypoint_sigmas is not None:
            from dfx.detection.keypoints import LOSS_KEYPOINTS, LOSS_OKS

            self.keypoint_sigmas = torch.as_tensor(keypoint_sigmas, dtype=torch.float32)
            self.weights.update(keypoints=LOSS_KEYPOINTS, oks=LOSS_OKS)
            if self.matcher.keypoint_sigmas is None:
                self.matcher.keypoint_sigmas = self.keypoint_sigmas
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.one2many_k, self.one2many_weight = one2many_k, one2many_weight

    @classmethod
    def from_config(cls, num_classes: int, loss: SetLossConfig, hybrid: HybridLossConfig | None = None,
                    masks: MaskLossConfig | None = None, keypoint_sigmas=None):
        """The criterion (and its matcher) of a :class:`SetLossConfig`, :class:`HybridLossConfig`,
        (MaskDINO) :class:`MaskLossConfig` and (ED-Pose) the keypoints' OKS sigmas."""
        hybrid = hybrid or HybridLossConfig()
        matcher = HungarianMatcher(loss.cost_class, loss.cost_bbox, loss.cost_giou, loss.focal_alpha, loss.focal_gamma,
                                   masks)
        return cls(num_classes, matcher, loss.class_weight, loss.bbox_weight, loss.giou_weight, loss.focal_alpha,
                   loss.focal_gamma, hybrid.one2many_k, hybrid.one2many_weight, masks, keypoint_sigmas)

    def terms(self, outputs: dict, targets: list[dict], num_boxes: float, indices=None) -> dict:
        """Unweighted L_class, L_l1, L_giou of one set of predictions (matched here unless given;
        ``targets`` as :func:`~dfx.detection.matcher.check_targets` accepts them, which forward() checks)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if indices is None:
            indices = self.matcher(outputs, targets, validate=False)
        # the indices live on the host; a blocking copy to the GPU would wait for its queue to drain
        device = logits.device
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device, non_blocking=True)
        query_idx = torch.cat([q for q, _ in indices]).to(device, non_blocking=True)
        target_idx = [j.to(t["labels"].device, non_blocking=True) for t, (_, j) in zip(targets, indices)]
        labels = torch.cat([t["labels"][j] for t, j in zip(targets, target_idx)])
        matched_targets = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, j in zip(targets, target_idx)])

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, labels.to(logits.device)] = 1.0
        class_loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        matched = boxes[batch_idx, query_idx]
        matched_targets = matched_targets.to(matched)
        l1 = (matched - matched_targets).abs().sum()
        giou = generalized_box_iou_loss(box_convert(matched, "cxcywh", "xyxy"),
                                        box_convert(matched_targets, "cxcywh", "xyxy"), reduction="sum")
        terms = {"class": class_loss / num_boxes, "l1": l1 / num_boxes, "giou": giou / num_boxes}
        if self.masks is not None and "pred_masks" in outputs:
            target_masks = torch.cat([t["masks"][j.to(t["masks"].device)] for t, j in zip(targets, target_idx)])
            m = self.masks
            terms["mask"], terms["dice"] = mask_losses(outputs["pred_masks"][batch_idx, query_idx],
                                                       target_masks.to(device), num_boxes, m.mask_points,
                                                       m.oversample_ratio, m.importance_sample_ratio)
        if self.keypoint_sigmas is not None and "pred_keypoints" in outputs:
            from dfx.detection.keypoints import pose_losses, target_area

            points = outputs["pred_keypoints"][batch_idx, query_idx]
            truth = torch.cat([t["keypoints"][j.to(t["keypoints"].device)] for t, j in zip(targets, target_idx)])
            area = torch.cat([target_area(t)[j.to(t["boxes"].device)] for t, j in zip(targets, target_idx)])
            pose = pose_losses(points, truth.to(points), area.to(points), self.keypoint_sigmas.to(points), num_boxes)
            terms["keypoints"], terms["oks"] = pose["loss_keypoints"], pose["loss_oks"]
        return terms

    def weighted(self, terms: dict) -> Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())

    def group_loss(self, outputs: dict, targets: list[dict], num_boxes: float, repeat: int = 1) -> tuple[Tensor, dict]:
        """Final layer + auxiliary layers of one query group, matched against ``targets`` each repeated
        ``repeat`` times (the matcher tiles one cost matrix instead of building ``repeat`` copies)."""
        repeated = repeat_targets(targets, repeat) if repeat > 1 else targets
        total, last = 0.0, None
        for layer in [outputs, *outputs.get("aux_outputs", [])]:
            terms = self.terms(layer, repeated, num_boxes, self.matcher(layer, targets, repeat, validate=False))
            total = total + self.weighted(terms)
            last = last or terms
        return total, last

    def forward(self, outputs: dict, targets: list[dict]) -> tuple[Tensor, dict]:
        # Checked once here rather than in each of the (layers x groups) matchings: every check
        # of device tensors stalls the host until the GPU catches up.
        check_targets(targets, outputs["pred_logits"].shape[0], self.num_classes)
        if self.masks is not None and "pred_masks" in outputs:
            _check_masks(targets)
        num_boxes = _global_box_count(targets, outputs["pred_logits"].device)
        total, last = self.group_loss(outputs, targets, num_boxes)
        logged = {f"loss_{name}": self.weights[name] * value for name, value in last.items()}
        logged["one2one"] = total
        if "enc_outputs" in outputs:
            enc_targets = targets
            if outputs["enc_outputs"]["pred_logits"].shape[-1] == 1:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = self.weighted(self.terms(outputs["enc_outputs"], enc_targets, num_boxes))
            logged["enc"] = enc
            total = total + enc
        if "one2many" in outputs and self.one2many_weight > 0:
            many, _ = self.group_loss(outputs["one2many"], targets, num_boxes * self.one2many_k, self.one2many_k)
            logged["one2many"] = many
            total = total + self.one2many_weight * many
        if "dn" in outputs:  # DINO's denoising part: every decoder layer, fixed matching
            dn = denoising_loss(self, outputs["dn"], targets, num_boxes)
            logged["dn"] = dn
            total = total + dn
        # one host read for every logged number
        logs = dict(zip(logged, torch.stack([value.detach().float() for value in logged.values()]).tolist()))
        if "dn" in outputs:
            logs["dn_groups"] = outputs["dn"]["groups"]
        return total, logs


def _check_masks(targets: list[dict]) -> None:
    """Raise ValueError naming the first target without instance masks of its objects."""
    for i, target in enumerate(targets):
        masks = target.get("masks")
        if masks is None or masks.dim() != 3 or len(masks) != len(target["labels"]):
            got = "none" if masks is None else f"shape {tuple(masks.shape)}"
            raise ValueError(f"targets[{i}]['masks'] must be [{len(target['labels'])}, H, W] (one mask per object) "
                             f"for the mask losses, got {got}; load the data with masks (model.masks: true)")


def _global_box_count(targets: list[dict], device) -> float:
    """Target boxes in the whole batch (summed over processes), at least 1."""
    count = float(sum(len(t["labels"]) for t in targets))
    if dist.is_available() and dist.is_initialized():  # the one host read a multi-process step needs here
        summed = torch.tensor(count, device=device)
        dist.all_reduce(summed)
        count = float(summed / dist.get_world_size())
    return max(count, 1.0)
