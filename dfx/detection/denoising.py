"""DINO's contrastive denoising: noised ground truth as extra decoder queries during training.

Every target box and label of the batch is copied into ``G`` groups of ``2·M`` query slots
(``M`` the largest object count of an image in the batch): the first ``M`` slots of a group are
**positives** (slot ``j`` holds image object ``j``, noised mildly, trained to reconstruct it), the
next ``M`` are **negatives** (the same objects noised harder, trained as "no object"); slots past
an image's object count are padding (zero content, trained as "no object"). Query ``q`` of group
``g`` sits at ``g·2M + q``; the denoising part comes before the matching queries.

Noise, with ``λ`` = ``box_noise``:

- labels: each slot's label is replaced, with probability ``label_noise / 2``, by a class drawn
  uniformly (which may be the same one);
- boxes: each corner (x1, y1, x2, y2) moves by ``±u·λ·(w/2, h/2, w/2, h/2)`` with a random sign,
  ``u ~ U[0, 1)`` for positives and ``U[1, 2)`` for negatives; then clipped to the image. So a
  positive's centre moves by at most ``λ·w/2`` and its size stays in ``[1 − λ, 1 + λ]`` times the
  original, while a negative's corners move between 1× and 2× that far.

``G = dn_queries // M`` (``dn_queries`` is the reference's ``dn_number``, doubled there for the
positive and negative halves before dividing by ``2·M``: up to ``2·dn_queries`` denoising queries);
when ``dn_queries < M`` dfx falls back to one group, i.e. ``2·M`` denoising queries for that batch,
as the references do. IDEA-Research/DINO divides only budgets of 50 and more (a doubled
``dn_number`` of at least 100): below that it makes ``G = 2·dn_queries`` groups whatever ``M``
(``model.dn_groups: dino``); detrex always divides (``dn_groups: per_object``, the default).

Label noise draws from ``label_book`` ids (``num_classes`` unless the recipe sets
``model.dn_label_book``): IDEA-Research/DINO indexes its classes by COCO category id and draws noise
labels from all 91 ids, 11 of which are no category; ``dn_label_book: 91`` with 80 classes draws
the same way, ids past the classes having denoising label embeddings of their own.

Self-attention (:func:`denoising_attention_mask`): matching queries never see denoising queries,
denoising groups never see each other; a denoising group sees itself and the one-to-one queries,
as in DINO. With H-DETR's one-to-many group the latter stays isolated from everything else.
Losses (:func:`denoising_loss`): the criterion's focal + L1 + GIoU with its weights on every
decoder layer (not the encoder), positives matched to their own object, normalised by
``G·N`` boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_convert

from dfx.detection.transformer import group_attention_mask


@dataclass
class DenoisingQueries:
    """The denoising part of one batch.

    labels [B, G·2M] long (noised; 0 at padding), boxes [B, G·2M, 4] cxcywh in [0, 1] (noised;
    0.5 at padding), present [B, G·2M] bool (slot holds an object), groups ``G``, group_size ``2M``.
    """

    labels: Tensor
    boxes: Tensor
    present: Tensor
    groups: int
    group_size: int

    @property
    def size(self) -> int:
        return self.groups * self.group_size


def denoising_groups(dn_queries: int, max_objects: int, rule: str = "per_object") -> int:
    """Groups of ``2·max_objects`` queries (0 without objects): ``dn_queries // max_objects``, at
    least 1; with ``rule`` "dino", ``2·dn_queries`` for budgets below 50, as IDEA-Research/DINO counts."""
    if max_objects == 0 or dn_queries <= 0:
        return 0
    if rule == "dino" and dn_queries < 50:  # its doubled dn_number below 100 is not divided
        return 2 * dn_queries
    return max(1, dn_queries // max_objects)


def noised_queries(targets: list[dict], dn_queries: int, label_book: int, label_noise: float = 0.5,
                   box_noise: float = 1.0, generator: torch.Generator | None = None,
                   group_rule: str = "per_object") -> DenoisingQueries | None:
    """Noise the targets (per image {"labels": [n], "boxes": [n, 4] cxcywh}) into denoising queries.

    Noised labels are drawn from ``[0, label_book)`` (the classes, plus ids that are no class when
    ``label_book`` is larger than the number of classes).

    Returns None when the batch has no object. ``generator`` (on the targets' device) makes the
    noise reproducible; None uses torch's global generator (seeded by the run's seed).
    """
    counts = [len(t["labels"]) for t in targets]
    max_objects = max(counts, default=0)
    groups = denoising_groups(dn_queries, max_objects, group_rule)
    if groups == 0:
        return None
    device = targets[0]["boxes"].device
    batch, half = len(targets), max_objects
    size = groups * 2 * half
    # slot -> (group, polarity, object): [G, 2, M] laid out as g·2M + polarity·M + j
    labels = torch.zeros(batch, groups, 2, half, dtype=torch.long, device=device)
    boxes = torch.full((batch, groups, 2, half, 4), 0.5, device=device)
    present = torch.zeros(batch, groups, 2, half, dtype=torch.bool, device=device)
    for image, (target, count) in enumerate(zip(targets, counts)):
        labels[image, :, :, :count] = target["labels"].to(device)
        boxes[image, :, :, :count] = target["boxes"].to(device=device, dtype=boxes.dtype)
        present[image, :, :, :count] = True

    if label_noise > 0:
        flip = torch.rand(labels.shape, generator=generator, device=device) < label_noise * 0.5
        random_labels = torch.randint(0, label_book, labels.shape, generator=generator, device=device)
        labels = torch.where(flip & present, random_labels, labels)
    if box_noise > 0:
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_size = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2  # (w/2, h/2, w/2, h/2)
        magnitude = torch.rand(corners.shape, generator=generator, device=device)
        magnitude[:, :, 1] += 1.0  # negatives: between 1x and 2x the positives' range
        sign = torch.randint(0, 2, corners.shape, generator=generator, device=device) * 2.0 - 1.0
        corners = (corners + sign * magnitude * half_size * box_noise).clamp(0.0, 1.0)
        noised = box_convert(corners, "xyxy", "cxcywh")
        noised[..., 2:] = noised[..., 2:].clamp(min=0.0)  # crossed corners give an empty box, as in DINO
        boxes = torch.where(present[..., None], noised, boxes)
    return DenoisingQueries(labels.view(batch, size), boxes.view(batch, size, 4), present.view(batch, size), groups,
                            2 * half)


def denoising_attention_mask(groups: int, group_size: int, matching: list[int], device=None) -> Tensor:
    """[T, T] bool, True where query i may NOT attend to key j, T = groups·group_size + Σ matching.

    Order: the denoising groups, then the matching groups (``matching``: one-to-one, then H-DETR's
    one-to-many if any). A denoising group sees itself and the one-to-one queries; a matching
    group sees only itself.
    """
    size = groups * group_size
    mask = group_attention_mask([group_size] * groups + list(matching), device)
    one2one = slice(size, size + matching[0])
    mask[:size, one2one] = False
    return mask


def denoising_indices(targets: list[dict], groups: int, group_size: int) -> list[tuple[Tensor, Tensor]]:
    """Per image (query index, target index): each group's positive slots matched to their objects."""
    indices = []
    for target in targets:
        count = len(target["labels"])
        objects = torch.arange(count)
        queries = (torch.arange(groups)[:, None] * group_size + objects[None]).flatten()
        indices.append((queries, objects.repeat(groups)))
    return indices


def denoising_loss(criterion, outputs: dict, targets: list[dict], num_boxes: float) -> Tensor:
    """Reconstruction loss of the denoising part: ``criterion``'s weighted terms on the last and every
    auxiliary decoder layer, with the fixed positive matching, normalised by ``groups · num_boxes``.

    outputs: {"pred_logits": [B, P, K], "pred_boxes": [B, P, 4], "aux_outputs": [...], "groups",
    "group_size"}, as :class:`~dfx.detection.detector.DeformableDETR` returns under ``"dn"``.
    """
    indices = denoising_indices(targets, outputs["groups"], outputs["group_size"])
    total = 0.0
    for layer in [outputs, *outputs.get("aux_outputs", [])]:
        total = total + criterion.weighted(criterion.terms(layer, targets, num_boxes * outputs["groups"], indices))
    return total
