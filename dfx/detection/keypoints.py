"""ED-Pose's keypoint branch as a head of the one detector: human queries, then keypoint queries.

ED-Pose (Yang et al., ICLR 2023) is a DINO whose decoder works in two stages:

1. **Human stage** (the first ``box_layers`` decoder layers): the selected queries are refined as
   boxes, exactly as DINO's.
2. **Expansion** (after the last human layer): the ``groups`` queries with the highest class logit
   are kept; each becomes a group of ``1 + K`` queries: the human query itself, and one query per
   keypoint whose content is the human's plus a learned keypoint embedding. A keypoint query's
   reference is a small box: its centre is the human box's centre moved by the pose head's offset
   (in inverse-sigmoid space), its size a learned share (sigmoid) of the human box's size. The
   expansion reads the pose head of the *last* layer for COCO's 17 keypoints (that skeleton has one
   pose head more than keypoint layers) and of the first keypoint layer for other skeletons, as
   ED-Pose does.
3. **Keypoint stage** (the remaining layers): self-attention within each group, and among all the
   human queries (:func:`pose_attention_mask`); human boxes are refined by the box heads, keypoint
   boxes by the pose heads (centre) and the one shared pose size head (size). A layer's keypoints
   are the centres of its refined keypoint boxes.

Layout: batch first, ``[B, groups * (1 + K), C]`` with each group's human query first (ED-Pose keeps
queries first and flattens the same way, so query ``g * (1 + K)`` is group g's human).

Matching in the keypoint stage (:func:`pose_cost`) is ED-Pose's: the focal class cost (2) plus the
visibility-weighted L1 distance of the normalised keypoints (10) plus 1 - OKS (4), box costs off;
the losses (:func:`pose_losses`) are the same L1 (weight 10) and the linear OKS loss 1 - OKS (4),
summed over matched humans and divided by the number of targets. OKS uses the dataset's sigmas and
an area in normalised units (the target's ``area_norm`` from the data, else 0.53 x its box).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dfx.detection.transformer import INVERSE_SIGMOID_EPS, MLP, inverse_sigmoid

COST_CLASS, COST_KEYPOINTS, COST_OKS = 2.0, 10.0, 4.0  # ED-Pose's set_cost_* (box costs 0 in the keypoint stage)
LOSS_KEYPOINTS, LOSS_OKS = 10.0, 4.0  # ED-Pose's keypoints_loss_coef, oks_loss_coef
BOX_AREA_SHARE = 0.53  # a person's area per box area where no area is given
_LOG_EPS = 1e-8


class KeypointHead(nn.Module):
    """The keypoint embeddings and pose heads of ED-Pose (see the module docstring).

    ``keypoint_layers``: decoder layers after the expansion (decoder layers - human layers).
    """

    def __init__(self, dim: int, num_keypoints: int, groups: int, keypoint_layers: int,
                 eps: float = INVERSE_SIGMOID_EPS):
        super().__init__()
        if num_keypoints < 1 or groups < 1 or keypoint_layers < 1:
            raise ValueError(f"keypoints: num_keypoints, groups and keypoint layers must be >= 1, got "
                             f"{num_keypoints}, {groups}, {keypoint_layers}")
        self.num_keypoints, self.groups, self.eps = num_keypoints, groups, eps
        self.keypoint_embed = nn.Embedding(num_keypoints, dim)
        self.hw = nn.Embedding(num_keypoints, 2)
        pose = MLP(dim, dim, 2, 3)
        nn.init.zeros_(pose.layers[-1].weight)
        nn.init.zeros_(pose.layers[-1].bias)
        count = keypoint_layers + (num_keypoints == 17)
        self.pose_heads = nn.ModuleList(copy.deepcopy(pose) for _ in range(count))
        self.size_head = MLP(dim, dim, 2, 3)  # one module for every keypoint layer, as in ED-Pose

    @property
    def group_size(self) -> int:
        return 1 + self.num_keypoints

    def expansion_head(self) -> nn.Module:
        return self.pose_heads[-1] if self.num_keypoints == 17 else self.pose_heads[0]

    def expand(self, states: Tensor, boxes: Tensor, logits: Tensor, groups: int | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """The expansion step: states [B, Q, C], refined boxes [B, Q, 4] (cxcywh in [0, 1]) and class
        logits [B, Q, N] of the last human layer -> (states [B, G(1+K), C], references [B, G(1+K), 4],
        the kept query indices [B, G]); G: ``groups`` (default the head's)."""
        keep = torch.topk(logits.max(-1).values, groups or self.groups, dim=1).indices  # [B, G]
        human = torch.gather(states, 1, keep[..., None].expand(-1, -1, states.shape[-1]))
        box = torch.gather(boxes, 1, keep[..., None].expand(-1, -1, 4))
        points = human[:, :, None] + self.keypoint_embed.weight[None, None]  # [B, G, K, C]
        delta = self.expansion_head()(points)[..., :2]
        centre = (inverse_sigmoid(box[:, :, None, :2], self.eps) + delta).sigmoid()
        size = self.hw.weight.sigmoid()[None, None] * box[:, :, None, 2:]
        references = torch.cat((box[:, :, None], torch.cat((centre, size), -1)), 2).flatten(1, 2)
        return torch.cat((human[:, :, None], points), 2).flatten(1, 2), references, keep

    def refine(self, layer: int, states: Tensor, references: Tensor, box_delta) -> tuple[Tensor, Tensor, Tensor]:
        """One keypoint-stage refinement. ``layer``: the index among the keypoint layers; states and
        references [B, G(1+K), ...] as :meth:`expand` lays them out; ``box_delta(states)`` -> box
        deltas of human states. Returns (human boxes [B, G, 4], keypoints [B, G, K, 2] (x, y in [0, 1]),
        the next references [B, G(1+K), 4])."""
        k = self.num_keypoints
        b, g = states.shape[0], states.shape[1] // (1 + k)
        grouped = states.view(b, g, 1 + k, -1)
        ref = references.view(b, g, 1 + k, 4)
        human_box = (box_delta(grouped[:, :, 0]) + inverse_sigmoid(ref[:, :, 0], self.eps)).sigmoid()
        points, point_ref = grouped[:, :, 1:], inverse_sigmoid(ref[:, :, 1:], self.eps)
        centre = point_ref[..., :2] + self.pose_heads[layer](points)
        size = point_ref[..., 2:] + self.size_head(points)
        point_box = torch.cat((centre, size), -1).sigmoid()
        nxt = torch.cat((human_box[:, :, None], point_box), 2).flatten(1, 2)
        return human_box, point_box[..., :2], nxt


def pose_decode(decoder, head: KeypointHead, box_layers: int, tgt: Tensor, reference: Tensor, memory: Tensor,
                shapes, valid_ratios: Tensor, memory_mask: Tensor, box_delta, class_logits, groups: list[int],
                expanded: list[int]) -> list[list[dict]]:
    """Run ``decoder``'s layers as ED-Pose does: ``box_layers`` human layers over the query groups
    ``groups`` (sizes; each attends within itself), the expansion of each group into ``expanded[i]``
    pose groups, then the keypoint layers under :func:`pose_attention_mask` (per query group, the
    query groups blind to each other). ``decoder``: a DINO :class:`~dfx.detection.transformer.Decoder`
    (per-layer positional queries, box refinement); ``box_delta(layer, states)``,
    ``class_logits(layer, states)``: the detector's heads.

    Returns per query group the per-layer predictions: human layers {"pred_logits" [B, Q, N],
    "pred_boxes"}; keypoint layers {"pred_logits" [B, G, N], "pred_boxes" [B, G, 4],
    "pred_keypoints" [B, G, K, 2]} of the human queries. A layer's predictions are built on its
    input reference with the gradient of the refinement that made it (look forward twice); the
    next layer samples at the detached refinement, from the un-normalised output.
    """
    from dfx.detection.transformer import _refine

    if decoder.ref_point_head is None or not decoder.box_refine:
        raise ValueError("keypoints: ED-Pose decodes with DINO's decoder: set query_position: per_layer and "
                         "box_refine: true")
    if not 0 < box_layers < len(decoder.layers):
        raise ValueError(f"keypoints: box_layers must be between 1 and decoder_layers - 1 "
                         f"({len(decoder.layers) - 1}), got {box_layers}")
    norm = decoder.norm or nn.Identity()
    k = head.num_keypoints
    outputs: list[list[dict]] = [[] for _ in groups]
    sampling_ref, prediction_ref = reference, reference
    mask, sizes = None, list(groups)
    for index, layer in enumerate(decoder.layers):
        scale = valid_ratios if sampling_ref.shape[-1] == 2 else torch.cat((valid_ratios, valid_ratios), -1)
        scaled = sampling_ref[:, :, None] * scale[:, None]
        query_pos = decoder.box_position(scaled[:, :, 0])
        tgt = layer(tgt, query_pos, scaled, memory, shapes, memory_mask, sizes, mask)
        state = norm(tgt)
        if index < box_layers:  # the human stage: DINO's layer
            delta = box_delta(index, state)
            boxes = _refine(prediction_ref, delta, decoder.eps)
            logits = class_logits(index, state)
            for out, b, l in zip(outputs, boxes.split(sizes, 1), logits.split(sizes, 1)):
                out.append({"pred_logits": l, "pred_boxes": b})
            refined = _refine(sampling_ref, delta if decoder.norm is None else box_delta(index, tgt), decoder.eps)
            if index == box_layers - 1:  # the expansion, per query group, from the un-normalised output
                parts = [head.expand(t, r, class_logits(index, t), g)[:2] for t, r, g in
                         zip(tgt.split(sizes, 1), refined.split(sizes, 1), expanded)]
                tgt = torch.cat([t for t, _ in parts], 1)
                refined = torch.cat([r for _, r in parts], 1)
                sizes = [g * (1 + k) for g in expanded]
                mask = pose_attention_mask(expanded, k, tgt.device)
            sampling_ref = refined.detach()
            prediction_ref = refined if decoder.look_forward_twice else sampling_ref
            continue
        j = index - box_layers
        step = lambda states: box_delta(index, states)  # noqa: E731
        nexts = []
        for out, s, t, p, r in zip(outputs, state.split(sizes, 1), tgt.split(sizes, 1),
                                   prediction_ref.split(sizes, 1), sampling_ref.split(sizes, 1)):
            boxes, points, _ = head.refine(j, s, p, step)
            out.append({"pred_logits": class_logits(index, s[:, 0 :: 1 + k]), "pred_boxes": boxes,
                        "pred_keypoints": points})
            nexts.append(head.refine(j, t, r, step)[2])  # t: the un-normalised output
        refined = torch.cat(nexts, 1)
        sampling_ref = refined.detach()
        prediction_ref = refined if decoder.look_forward_twice else sampling_ref
    return outputs


def pose_attention_mask(groups: int | list[int], num_keypoints: int, device=None) -> Tensor:
    """ED-Pose's self-attention mask after the expansion, [G(1+K), G(1+K)] bool (True: may not
    attend): every query attends within its own group; human queries also attend to every other
    group's human query. ``groups`` a list: the pose groups of several query groups (one-to-one,
    one-to-many) one after the other, each blind to the others."""
    size = 1 + num_keypoints
    counts = [groups] if isinstance(groups, int) else list(groups)
    owner = torch.cat([torch.full((g * size,), i, device=device) for i, g in enumerate(counts)])
    group = torch.arange(sum(counts) * size, device=device) // size
    human = torch.arange(sum(counts) * size, device=device) % size == 0
    together = human[:, None] & human[None, :] & (owner[:, None] == owner[None, :])
    return (group[:, None] != group[None, :]) & ~together


def _oks(points: Tensor, target: Tensor, visible: Tensor, area: Tensor, sigmas: Tensor, pairwise: bool) -> Tensor:
    """OKS as ED-Pose's matcher and loss compute it (normalised coordinates and area; 1e-6 in the
    denominator): pairwise [P, T] or matched [P] (points [P, K, 2], target [T|P, K, 2])."""
    if pairwise:
        squared = ((points[:, None] - target[None]) ** 2).sum(-1)  # [P, T, K]
        variances = (2 * sigmas) ** 2
        e = torch.exp(-squared / (area[None, :, None] * variances * 2)) * visible[None]
        return e.sum(-1) / (visible.sum(-1)[None] + 1e-6)
    squared = ((points - target) ** 2).sum(-1)
    e = torch.exp(-squared / (area[:, None] * (2 * sigmas) ** 2 * 2)) * visible
    return e.sum(-1) / (visible.sum(-1) + 1e-6)


def target_area(target: dict) -> Tensor:
    """Normalised areas [n] for OKS: ``area_norm`` when the target has it, else 0.53 x the box."""
    if "area_norm" in target:
        return target["area_norm"]
    boxes = target["boxes"]
    return BOX_AREA_SHARE * boxes[:, 2] * boxes[:, 3]


def pose_cost(logits: Tensor, keypoints: Tensor, labels: Tensor, target_keypoints: Tensor, area: Tensor,
              sigmas: Tensor, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
              weights: tuple[float, float, float] = (COST_CLASS, COST_KEYPOINTS, COST_OKS)) -> Tensor:
    """ED-Pose's keypoint-stage matching cost [P, T]: logits [P, N], keypoints [P, K, 2] (normalised),
    labels [T], target_keypoints [T, K, 3] (normalised x, y, visibility), area [T] (normalised),
    sigmas [K]. ``weights``: (class, keypoint L1, 1 - OKS)."""
    prob = logits.sigmoid()[:, labels]
    positive = focal_alpha * (1 - prob) ** focal_gamma * -(prob + _LOG_EPS).log()
    negative = (1 - focal_alpha) * prob ** focal_gamma * -(1 - prob + _LOG_EPS).log()
    visible = (target_keypoints[..., 2] > 0).to(keypoints.dtype)  # [T, K]
    truth = target_keypoints[..., :2]
    l1 = ((keypoints[:, None] - truth[None]).abs().sum(-1) * visible[None]).sum(-1)
    oks = _oks(keypoints, truth, visible, area, sigmas, pairwise=True).clamp(min=1e-6)
    return weights[0] * (positive - negative) + weights[1] * l1 + weights[2] * (1 - oks)


def pose_losses(keypoints: Tensor, target_keypoints: Tensor, area: Tensor, sigmas: Tensor,
                num_boxes: float) -> dict[str, Tensor]:
    """ED-Pose's keypoint losses of matched pairs (keypoints [P, K, 2], target_keypoints [P, K, 3],
    area [P]), unweighted: ``loss_keypoints`` (visibility-weighted L1) and ``loss_oks`` (1 - OKS),
    each summed and divided by ``num_boxes``."""
    if keypoints.shape[0] == 0:
        zero = keypoints.sum() * 0
        return {"loss_keypoints": zero, "loss_oks": zero.clone()}
    visible = (target_keypoints[..., 2] > 0).to(keypoints.dtype)
    truth = target_keypoints[..., :2]
    l1 = ((keypoints - truth).abs() * visible[..., None]).sum()
    oks = _oks(keypoints, truth, visible, area, sigmas, pairwise=False)
    return {"loss_keypoints": l1 / num_boxes, "loss_oks": (1 - oks).sum() / num_boxes}


def keypoint_results(image_ids, keypoints, scores, category_id: int) -> list[dict]:
    """COCO keypoint results: per image, keypoints [D, K, 2] in pixels and scores [D] ->
    ``{"image_id", "category_id", "keypoints": [x, y, 1] * K, "score"}`` (v=1: predicted)."""
    out = []
    for image_id, points, image_scores in zip(image_ids, keypoints, scores):
        points = torch.as_tensor(points, dtype=torch.float64).cpu()
        for pose, score in zip(points, torch.as_tensor(image_scores).cpu().tolist()):
            flat = torch.cat((pose, torch.ones(len(pose), 1, dtype=pose.dtype)), 1).flatten()
            out.append({"image_id": int(image_id), "category_id": int(category_id),
                        "keypoints": [round(v, 2) for v in flat.tolist()], "score": float(score)})
    return out


def detection_keypoints(pred_keypoints: Tensor, detections: list[dict], sizes: Tensor) -> list[Tensor]:
    """The keypoints of post-processed detections in pixels: pred_keypoints [B, Q, K, 2] (x, y in
    [0, 1] of the unpadded image), each detection's ``queries`` [D], sizes [B, 2] (height, width) ->
    per image [D, K, 2]."""
    out = []
    for points, found, (height, width) in zip(pred_keypoints, detections, sizes.tolist()):
        picked = points[found["queries"]]
        out.append(picked * picked.new_tensor([width, height]))
    return out
