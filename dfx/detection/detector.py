"""Deformable-DETR with the paper switches and H-DETR's hybrid (one-to-many) query group.

One model; every variant is a :class:`DetectorConfig` value:

- ``two_stage``: the encoder's tokens propose boxes (a class head and a box head on each token,
  relative to a fixed-size proposal at its position); the top-scoring proposals seed the queries.
  ``two_stage_scoring``: ``agnostic`` (Deformable-DETR, H-DETR) scores a proposal by one
  objectness logit, trained with every target relabelled to one class; ``class_aware`` (DINO)
  gives the encoder head every class and ranks by the best one.
- ``box_refine``: each decoder layer refines the previous layer's box (per-layer heads).
- ``mixed_query_selection``: with two-stage, the selected boxes give only the *positional* queries;
  the content queries are learned embeddings.
- ``look_forward_twice``: a layer's box is built on the previous layer's refined box with its
  gradient, so its box loss trains its own box head and the previous layer's (no further back).
- ``one2many_queries`` > 0: H-DETR's extra group, trained with one-to-many matching. The two groups
  share every layer but cannot see each other in self-attention; at inference (``model.eval()``)
  only the ``one2one_queries`` run, so inference costs what the baseline costs.
- ``dn_queries`` > 0: DINO's contrastive denoising (:mod:`dfx.detection.denoising`): in training,
  ``forward(images, mask, targets)`` adds noised ground-truth queries before the matching ones,
  under an attention mask; nothing of it runs at inference.

DINO's decoder differs from Deformable-DETR's in switches of the same model (IDEA-Research/DINO's
``DINO_4scale`` sets them all; detrex's ``dino_r50_4scale_12ep`` all but ``shared_heads``):

- ``query_position: per_layer``: each decoder layer builds its positional queries from its own
  reference box (sine encoding -> ``decoder.ref_point_head``), denoising queries included;
  ``proposal`` (Deformable-DETR) encodes the selected proposal once (``pos_trans``) for all layers.
- ``decoder_norm``: a final LayerNorm on what the heads read; the next reference is refined from
  the un-normalised output.
- ``encoder_loss: selected``: the two-stage loss scores only the top-``one2one_queries`` proposals
  (DINO's interm outputs); ``all``: every encoder token (Deformable-DETR).
- ``shared_heads``: one class head and one box head for every decoder layer.
- ``content_query_init: xavier``, ``inverse_sigmoid_eps`` 1e-3, and the pixel encoding's
  ``position_temperature`` / ``position_offset`` (DINO: 20 and 0; detrex: 10000 and -0.5).

MaskDINO is the ``masks`` switch (:mod:`dfx.detection.masks`): the backbone also gives its stride-4
stage, every decoder layer's output carries ``pred_masks`` [B, Q, H/4, W/4] (logits on the padded
batch's stride-4 grid), and the initial queries are predicted too (MaskDINO's ``initial_pred``: class,
mask and their reference box, first of ``aux_outputs``); with ``encoder_loss: selected`` the selected
proposals carry masks as well. The mask embedding reads the decoder's final norm of each output
(MaskDINO's ``forward_prediction_heads``; with ``decoder_norm`` the decoder has normed it once already,
as in the reference).

ED-Pose is the ``keypoints`` switch (K > 0; :mod:`dfx.detection.keypoints`): DINO's decoder detects
people in its first ``box_layers`` layers, then the top ``pose_groups`` human queries are each
expanded into one human query and K keypoint queries, refined as small boxes by the later layers.
Those layers' predictions are of the human queries only and carry ``pred_keypoints`` [B, G, K, 2]
(x, y in [0, 1]); with ``one2many_queries`` the hybrid group expands into
``pose_groups * one2many_queries // one2one_queries`` pose groups of its own.

Output of ``forward(images [B, 3, H, W], mask [B, H, W] True at padding)``::

    {"pred_logits": [B, Q1, K], "pred_boxes": [B, Q1, 4] (cxcywh in [0, 1] of the unpadded image),
     "aux_outputs": [{"pred_logits", "pred_boxes"}] * (decoder_layers - 1),
     ("pred_masks" [B, Q1, H/4, W/4] in every prediction with ``masks``; one more aux entry first)
     "enc_outputs": {"pred_logits": [B, S, K or 1], "pred_boxes": [B, S, 4]}     (two-stage only),
     "one2many": {"pred_logits": [B, Q2, K], "pred_boxes", "aux_outputs"}        (training, Q2 > 0),
     "dn": {"pred_logits": [B, P, K], "pred_boxes", "aux_outputs", "groups", "group_size"}
                                                               (training with targets, dn_queries > 0)}
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from dfx.detection.backbone import Backbone, InputProjection
from dfx.detection.deformable_attention import MultiScaleDeformableAttention
from dfx.detection.denoising import denoising_attention_mask, noised_queries
from dfx.detection.keypoints import KeypointHead, pose_decode
from dfx.detection.masks import MaskHead, mask_boxes
from dfx.detection.position import box_position_encoding, pixel_position_encoding
from dfx.detection.transformer import INVERSE_SIGMOID_EPS, MLP, Decoder, Encoder, inverse_sigmoid
from dfx.errors import UsageError

DETECTIONS = 100  # (query, class) pairs kept per image by postprocess, as in Deformable-DETR's evaluation


@dataclass
class DetectorConfig:
    """Architecture of the detector (the recipe's ``model`` section maps onto it)."""

    num_classes: int = 80
    backbone: str = "resnet50"
    pretrained: str | None = None  # backbone weights: a dfx.hub spec (r50, a timm name, a file, hf://); None: random
    backbone_kwargs: dict = field(default_factory=dict)  # extra timm arguments, e.g. narrower channels
    frozen_bn: bool = True
    backbone_frozen_stages: int = 0  # 1: the stem and first stage stay fixed (the reference's choice)
    dim: int = 256
    heads: int = 8
    levels: int = 4
    points: int = 4
    encoder_layers: int = 6
    decoder_layers: int = 6
    ffn_dim: int = 1024
    dropout: float = 0.1
    two_stage: bool = False
    two_stage_scoring: Literal["agnostic", "class_aware"] = "agnostic"  # class_aware: rank by the best class (DINO)
    box_refine: bool = False
    mixed_query_selection: bool = False
    look_forward_twice: bool = False
    one2one_queries: int = 300
    one2many_queries: int = 0
    hybrid_attention: Literal["grouped", "masked"] = "grouped"  # masked: one attention over both groups, block mask
    proposal_size: float = 0.05  # two-stage proposal side on the finest level (doubles per level)
    # DINO (dfx.detection.denoising): contrastive denoising queries in training; dn_queries 0: off
    dn_queries: int = 0  # DINO's dn_number: groups = dn_queries // (most objects of an image), at least 1
    dn_groups: Literal["per_object", "dino"] = "per_object"  # dino: 2 x dn_queries groups when dn_queries < 50
    dn_label_book: int = 0  # ids noise labels are drawn from; 0: num_classes (official DINO on COCO: 91 ids)
    label_noise: float = 0.5  # a denoising query's label is flipped with probability label_noise / 2
    box_noise: float = 1.0  # box corner jitter, in half widths/heights (negatives: 1x-2x that)
    position_temperature: float = 10000.0  # sine encoding of pixel positions (DINO: 20)
    position_offset: float = -0.5  # added to the 1-based pixel index before normalising (DINO: 0)
    # DINO's decoder (module docstring); the defaults are Deformable-DETR's
    query_position: Literal["proposal", "per_layer"] = "proposal"
    decoder_norm: bool = False
    encoder_loss: Literal["all", "selected"] = "all"
    shared_heads: bool = False
    content_query_init: Literal["normal", "xavier"] = "normal"
    inverse_sigmoid_eps: float = INVERSE_SIGMOID_EPS
    masks: bool = False  # MaskDINO's mask branch (dfx.detection.masks): a mask per query from the stride-4 map
    # MaskDINO: the decoder's first reference boxes are the selected proposals' mask boxes; mask2box: last
    # pixel inclusive (torchvision masks_to_boxes), bitmask: exclusive (detectron2 BitMasks); no: their boxes
    initialize_box_type: Literal["no", "mask2box", "bitmask"] = "no"
    # MaskDINO's dn "seg": the denoising queries predict masks and learn them too; false: its "standard"
    # (boxes and labels only)
    dn_masks: bool = True
    # MaskDINO: the class head reads the decoder norm of each layer's output, as the mask embedding does
    # (a second pass of the one norm), and classifies the selected proposals from their normed tokens
    class_norm: bool = False
    keypoints: int = 0  # ED-Pose: K keypoints per person (dfx.detection.keypoints); 0: boxes only
    pose_groups: int = 100  # ED-Pose's num_group: human queries expanded into keypoint queries
    box_layers: int = 2  # ED-Pose's num_box_decoder_layers: the human stage

    def validate(self) -> None:
        """Raise ValueError naming the field for inconsistent settings."""
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.dim % self.heads or self.dim % 2:
            raise ValueError(f"dim {self.dim} must be even and divide by heads {self.heads}")
        if self.one2one_queries < 1 or self.one2many_queries < 0:
            raise ValueError(f"one2one_queries must be >= 1 and one2many_queries >= 0, got "
                             f"{self.one2one_queries} and {self.one2many_queries}")
        if self.mixed_query_selection and not self.two_stage:
            raise ValueError("mixed_query_selection selects queries from two-stage proposals: set two_stage: true")
        if self.look_forward_twice and not self.box_refine:
            raise ValueError("look_forward_twice builds on iterative box refinement: set box_refine: true")
        for name, hint in typing.get_type_hints(DetectorConfig).items():
            options = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
            if options and getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {getattr(self, name)!r}")
        if self.backbone_frozen_stages < 0:
            raise ValueError(f"backbone_frozen_stages must be >= 0, got {self.backbone_frozen_stages}")
        if self.encoder_layers < 1 or self.decoder_layers < 1:
            raise ValueError("encoder_layers and decoder_layers must be >= 1")
        self._validate_denoising()
        if self.query_position == "per_layer" and not self.two_stage:
            raise ValueError("query_position per_layer encodes reference boxes, which two-stage proposals give: "
                             "set two_stage: true")
        if self.encoder_loss == "selected" and not self.two_stage:
            raise ValueError("encoder_loss selected scores the two-stage proposals: set two_stage: true")
        if self.keypoints:
            self._validate_keypoints()
        if self.masks and not self.two_stage:
            raise ValueError("masks: MaskDINO predicts masks of DINO's selected queries: set two_stage: true")
        if self.class_norm and not (self.masks and self.decoder_norm and self.encoder_loss == "selected"):
            raise ValueError("class_norm is MaskDINO's class path: set masks: true, decoder_norm: true and "
                             "encoder_loss: selected")
        if self.initialize_box_type != "no" and not (self.masks and self.encoder_loss == "selected"
                                                     and self.query_position == "per_layer"):
            raise ValueError("initialize_box_type boxes the selected proposals' masks: set masks: true, "
                             "encoder_loss: selected and query_position: per_layer")
        if not 0 < self.inverse_sigmoid_eps < 0.5:
            raise ValueError(f"inverse_sigmoid_eps must be in (0, 0.5), got {self.inverse_sigmoid_eps}")

    def _validate_keypoints(self) -> None:
        if self.keypoints < 0 or not 0 < self.box_layers < self.decoder_layers:
            raise ValueError(f"keypoints must be >= 0 and box_layers between 1 and decoder_layers - 1, got "
                             f"{self.keypoints} and {self.box_layers}")
        if not (self.two_stage and self.box_refine and self.query_position == "per_layer"):
            raise ValueError("keypoints: ED-Pose is a DINO: set two_stage: true, box_refine: true and "
                             "query_position: per_layer")
        if not 0 < self.pose_groups <= self.one2one_queries:
            raise ValueError(f"pose_groups must be in [1, one2one_queries = {self.one2one_queries}], "
                             f"got {self.pose_groups}")
        if self.masks or self.dn_queries:
            raise ValueError("keypoints: masks and denoising (dn_queries) do not combine with keypoints yet; "
                             "set masks: false and dn_queries: 0")

    def _validate_denoising(self) -> None:
        if self.dn_queries < 0:
            raise ValueError(f"dn_queries must be >= 0 (0 turns denoising off), got {self.dn_queries}")
        if not 0 <= self.label_noise <= 1:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")
        if self.box_noise < 0:
            raise ValueError(f"box_noise must be >= 0, got {self.box_noise}")
        if self.position_temperature <= 0:
            raise ValueError(f"position_temperature must be > 0, got {self.position_temperature}")
        if self.dn_label_book and self.dn_label_book < self.num_classes:
            raise ValueError(f"dn_label_book ({self.dn_label_book}) must be 0 or at least num_classes "
                             f"({self.num_classes}): it counts the ids noise labels are drawn from")
        if self.dn_queries and not self.two_stage:
            raise ValueError("dn_queries: denoising queries are boxes, like two-stage queries: set two_stage: true")


def _class_head(dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    prior = 0.01  # every class starts at probability 0.01, so the focal loss starts small
    nn.init.constant_(head.bias, -math.log((1 - prior) / prior))
    return head


def _box_head(dim: int) -> MLP:
    head = MLP(dim, dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


class DeformableDETR(nn.Module):
    """See the module docstring. ``config.num_classes`` sigmoid classes (no background class)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config.dim
        stages = min(3, config.levels)
        self.backbone = Backbone(config.backbone, config.pretrained, num_outs=stages + config.masks,
                                 frozen_bn=config.frozen_bn, kwargs=config.backbone_kwargs,
                                 frozen_stages=config.backbone_frozen_stages)
        self.input_proj = InputProjection(self.backbone.channels[-stages:], c, config.levels)
        self.mask_head = self._mask_head() if config.masks else None
        self.keypoint_head = (KeypointHead(c, config.keypoints, config.pose_groups,
                                           config.decoder_layers - config.box_layers, config.inverse_sigmoid_eps)
                              if config.keypoints else None)
        self.level_embed = nn.Parameter(torch.empty(config.levels, c).normal_())
        layer = dict(dim=c, heads=config.heads, levels=config.levels, points=config.points, ffn_dim=config.ffn_dim,
                     dropout=config.dropout)
        self.encoder = Encoder(config.encoder_layers, **layer)
        self.decoder = Decoder(config.decoder_layers, config.box_refine, config.look_forward_twice,
                               per_layer_position=config.query_position == "per_layer",
                               final_norm=config.decoder_norm, eps=config.inverse_sigmoid_eps, **layer)

        heads = config.decoder_layers if config.box_refine and not config.shared_heads else 1
        # as in the reference, every layer's (and the encoder's) heads start as copies of one head
        class_head, box_head = _class_head(c, config.num_classes), _box_head(c)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(heads))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(heads))
        total = config.one2one_queries + config.one2many_queries
        if config.two_stage:
            self.enc_output = nn.Linear(c, c)
            self.enc_output_norm = nn.LayerNorm(c)
            rows = 1 if config.two_stage_scoring == "agnostic" else config.num_classes  # 1: objectness
            self.enc_class_head = nn.Linear(c, rows)
            with torch.no_grad():
                self.enc_class_head.weight.copy_(class_head.weight[:rows])
                self.enc_class_head.bias.copy_(class_head.bias[:rows])
            self.enc_box_head = copy.deepcopy(box_head)
            if config.query_position == "proposal":
                # both halves are computed even with mixed selection, which keeps only the positional one
                self.pos_trans = nn.Linear(2 * c, 2 * c)
                self.pos_trans_norm = nn.LayerNorm(2 * c)
            if config.mixed_query_selection:
                self.content_queries = nn.Embedding(total, c)
        else:
            self.query_embed = nn.Embedding(total, 2 * c)  # positional and content halves
            self.reference_points = nn.Linear(c, 2)
        if config.dn_queries:
            # content of the denoising queries: a row per class, then per label-book id that is no class
            self.dn_label_embed = nn.Embedding(config.dn_label_book or config.num_classes, c)
        self._init_transformer()
        if not config.two_stage:
            # boxes predicted around a point reference start at w = h ~ 0.12 (two-stage ones start
            # from the proposal's own size)
            nn.init.constant_(self.box_heads[0].layers[-1].bias[2:], -2.0)

    def _mask_head(self) -> MaskHead:
        """The mask branch on the backbone stage before the transformer's finest one (stride 4 of 8)."""
        strides = self.backbone.strides
        if strides[1] != 2 * strides[0]:
            raise UsageError(f"model.masks: the backbone {self.config.backbone!r} gives strides {strides[:2]}, "
                             "the mask branch needs a stage at half the finest transformer stride")
        return MaskHead(self.backbone.channels[0], self.config.dim)

    def _init_transformer(self) -> None:
        """The reference's initialisation: xavier on every weight matrix of the encoder, decoder and
        query-selection layers, then the deformable attention's sampling pattern."""
        modules = [self.encoder, self.decoder]
        modules += [self.enc_output] if self.config.two_stage else [self.reference_points]
        if hasattr(self, "pos_trans"):
            modules.append(self.pos_trans)
        if hasattr(self, "content_queries") and self.config.content_query_init == "xavier":
            modules.append(self.content_queries)  # DINO's tgt_embed is a transformer parameter, so xavier
        for module in modules:
            for param in module.parameters():
                if param.dim() > 1:
                    nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        if not self.config.two_stage:
            nn.init.zeros_(self.reference_points.bias)

    # ------------------------------------------------------------------------------------------
    def _box_delta(self, layer: int, states: Tensor) -> Tensor:
        return self.box_heads[layer if len(self.box_heads) > 1 else 0](states)

    def _class_logits(self, layer: int, states: Tensor) -> Tensor:
        return self.class_heads[layer if len(self.class_heads) > 1 else 0](states)

    def _flatten(self, maps: list[Tensor], masks: list[Tensor]):
        """Multi-scale maps -> tokens [B, S, C], pos [B, S, C], mask [B, S], shapes (H, W) per level as
        Python ints (the attention takes them so: nothing to read back from the device), valid ratios [B, L, 2]."""
        tokens, positions, flat_masks, shapes, ratios = [], [], [], [], []
        for level, (feature, mask) in enumerate(zip(maps, masks)):
            shapes.append(tuple(feature.shape[-2:]))
            tokens.append(feature.flatten(2).transpose(1, 2))
            pos = pixel_position_encoding(mask, self.config.dim // 2, self.config.position_temperature,
                                          self.config.position_offset).to(feature.dtype)
            positions.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level])
            flat_masks.append(mask.flatten(1))
            valid = ~mask
            ratios.append(torch.stack((valid[:, 0, :].sum(1) / mask.shape[2], valid[:, :, 0].sum(1) / mask.shape[1]),
                                      -1))
        return (torch.cat(tokens, 1), torch.cat(positions, 1), torch.cat(flat_masks, 1), shapes,
                torch.stack(ratios, 1).to(maps[0].dtype))

    def _proposals(self, memory: Tensor, mask: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """One box per encoder token: its pixel centre, side ``proposal_size · 2^level``.

        Returns the memory with padded and border tokens zeroed, projected [B, S, C], and the
        proposals before the sigmoid [B, S, 4] (+inf where invalid: padding, or a proposal within
        1% of the border). As in the reference, invalid tokens stay in the ranking with the score
        their zeroed memory gets.
        """
        proposals, start = [], 0
        for level, (height, width) in enumerate(shapes):
            level_mask = mask[:, start : start + height * width].view(-1, height, width)
            valid_h = (~level_mask[:, :, 0]).sum(1).to(memory.dtype)
            valid_w = (~level_mask[:, 0, :]).sum(1).to(memory.dtype)
            ys, xs = torch.meshgrid(torch.arange(height, device=memory.device, dtype=memory.dtype),
                                    torch.arange(width, device=memory.device, dtype=memory.dtype), indexing="ij")
            cx = (xs.reshape(1, -1) + 0.5) / valid_w[:, None]
            cy = (ys.reshape(1, -1) + 0.5) / valid_h[:, None]
            side = torch.full_like(cx, self.config.proposal_size * 2.0**level)
            proposals.append(torch.stack((cx, cy, side, side), -1))
            start += height * width
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) & ~mask[..., None]
        proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
        memory = memory.masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def _queries(self, memory: Tensor, mask: Tensor, shapes, num_queries: int, out: dict):
        """(content queries [B, Q, C], positional queries [B, Q, C] or None (per-layer: the decoder
        builds them), reference [B, Q, 2|4])."""
        c, batch = self.config.dim, memory.shape[0]
        if not self.config.two_stage:
            # an embedding lookup, not a slice of the weight: views of parameters made under no_grad
            # confuse module hooks (FLOP counting, memory tracking)
            query_pos, content = self.query_embed(torch.arange(num_queries, device=memory.device)).split(c, -1)
            query_pos = query_pos[None].expand(batch, -1, -1)
            content = content[None].expand(batch, -1, -1)
            return content, query_pos, self.reference_points(query_pos).sigmoid()
        enc_memory, proposals = self._proposals(memory, mask, shapes)
        enc_logits = self.enc_class_head(enc_memory)
        enc_boxes = self.enc_box_head(enc_memory) + proposals  # before the sigmoid
        if enc_logits.shape[1] < num_queries:
            raise ValueError(f"two-stage selection needs {num_queries} encoder tokens, the image gives only "
                             f"{enc_logits.shape[1]}: use larger images or fewer queries")
        # agnostic: the objectness logit (the head's one row); class-aware: the best class
        scores = enc_logits[..., 0] if self.config.two_stage_scoring == "agnostic" else enc_logits.max(-1).values
        top = scores.topk(num_queries, dim=1).indices
        selected = torch.gather(enc_boxes, 1, top[..., None].expand(-1, -1, 4))
        if self.config.encoder_loss == "selected":
            picked = torch.gather(enc_logits, 1, top[..., None].expand(-1, -1, enc_logits.shape[-1]))
            out["enc_outputs"] = {"pred_logits": picked, "pred_boxes": selected.sigmoid()}
            if self.mask_head is not None:  # their masks need the pixel embedding: forward adds them
                out["enc_outputs"]["tokens"] = torch.gather(enc_memory, 1, top[..., None].expand(-1, -1, c))
        else:
            out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes.sigmoid()}
        reference = selected.detach().sigmoid()
        if self.config.query_position == "per_layer":
            query_pos = None
            content = torch.gather(enc_memory, 1, top[..., None].expand(-1, -1, c)).detach()
        else:
            query_pos, content = self._box_position(reference).split(c, -1)
        if self.config.mixed_query_selection:
            content = self.content_queries(torch.arange(num_queries, device=memory.device))[None].expand(batch, -1, -1)
        return content, query_pos, reference

    def _box_position(self, reference: Tensor) -> Tensor:
        """Boxes [B, Q, 4] in [0, 1] -> their projected sine encoding [B, Q, C or 2C]."""
        return self.pos_trans_norm(self.pos_trans(box_position_encoding(reference, self.config.dim // 2)))

    def _proposal_masks(self, stage4: Tensor, memory: Tensor, shapes, out: dict) -> Tensor:
        """MaskDINO's pixel embedding [B, C, H/4, W/4] (returned), and the selected proposals' masks in
        ``out["enc_outputs"]`` (with ``encoder_loss: selected``)."""
        height, width = shapes[0]
        encoded8 = memory[:, : height * width].transpose(1, 2).unflatten(-1, (height, width))
        mask_features = self.mask_head.pixel_embedding(stage4, encoded8)
        enc = out.get("enc_outputs", {})
        if "tokens" in enc:
            tokens = (self.decoder.norm or nn.Identity())(enc.pop("tokens"))
            enc["pred_masks"] = self.mask_head(tokens, mask_features)
            if self.config.class_norm:  # MaskDINO classifies the selected proposals from their normed tokens
                enc["pred_logits"] = self._class_logits(0, tokens)
        return mask_features

    def _add_masks(self, mask_features: Tensor, content: Tensor, reference: Tensor, states: list[Tensor],
                   layers: list[dict]) -> list[dict]:
        """MaskDINO: ``pred_masks`` on every decoder layer's prediction, and a prediction of the initial
        queries (content and reference as they enter the decoder) put first."""
        norm = self.decoder.norm or nn.Identity()
        for layer, state in zip(layers, states):
            layer["pred_masks"] = self.mask_head(norm(state), mask_features)
        initial = norm(content)
        layers.insert(0, {"pred_logits": self._class_logits(0, initial), "pred_boxes": reference,
                          "pred_masks": self.mask_head(initial, mask_features)})
        return layers

    def _add_denoising(self, targets, content: Tensor, query_pos: Tensor, reference: Tensor):
        """DINO: noised targets as queries placed before the matching ones -> (DenoisingQueries or None
        when the batch has no object, content, query_pos, reference)."""
        book = self.config.dn_label_book or self.config.num_classes
        dn = noised_queries(targets, self.config.dn_queries, book, self.config.label_noise, self.config.box_noise,
                            group_rule=self.config.dn_groups)
        if dn is None:  # no object in the batch; touch the embedding so DDP sees every parameter used
            return None, content + 0.0 * self.dn_label_embed.weight[0, 0], query_pos, reference
        dn_content = self.dn_label_embed(dn.labels) * dn.present[..., None]  # padding slots: zero content
        # the reference stores boxes before the sigmoid (its inverse_sigmoid clamps them)
        dn_boxes = inverse_sigmoid(dn.boxes.to(reference.dtype), self.config.inverse_sigmoid_eps).sigmoid()
        if query_pos is not None:
            query_pos = torch.cat((self._box_position(dn_boxes)[..., : self.config.dim], query_pos), 1)
        return dn, torch.cat((dn_content, content), 1), query_pos, torch.cat((dn_boxes, reference), 1)

    def forward(self, images: Tensor, mask: Tensor | None = None, targets: list[dict] | None = None) -> dict:
        """``targets`` (per image {"labels", "boxes" cxcywh}) feed the denoising queries in training."""
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        features, padded = self.backbone(images, mask)
        maps, masks = self.input_proj(features[-self.input_proj.num_stages :], padded)
        src, pos, flat_mask, shapes, valid_ratios = self._flatten(maps, masks)
        memory = self.encoder(src, pos, shapes, valid_ratios, flat_mask)

        one2one = self.config.one2one_queries
        one2many = self.config.one2many_queries if self.training else 0
        out: dict = {}
        content, query_pos, reference = self._queries(memory, flat_mask, shapes, one2one + one2many, out)
        mask_features = None
        if self.mask_head is not None:
            mask_features = self._proposal_masks(features[0][0], memory, shapes, out)
            if self.config.initialize_box_type != "no":
                exclusive = self.config.initialize_box_type == "bitmask"
                boxes = mask_boxes(out["enc_outputs"]["pred_masks"], padded, exclusive)
                reference = inverse_sigmoid(boxes, self.config.inverse_sigmoid_eps).sigmoid()  # the reference's clamp
        groups = [one2one, one2many] if one2many else [one2one]
        dn, attn_mask = None, None
        if self.training and self.config.dn_queries and targets is not None:
            dn, content, query_pos, reference = self._add_denoising(targets, content, query_pos, reference)
        if dn is not None:
            attn_mask = denoising_attention_mask(dn.groups, dn.group_size, groups, images.device)
            groups = [dn.size, *groups]
        if self.keypoint_head is not None:
            return self._pose_outputs(content, reference, memory, shapes, valid_ratios, flat_mask, groups, out)
        states, boxes = self.decoder(content, query_pos, reference, memory, shapes, valid_ratios, flat_mask,
                                     self._box_delta, groups, masked=self.config.hybrid_attention == "masked",
                                     attn_mask=attn_mask)
        class_input = self.decoder.norm if self.config.class_norm else (lambda state: state)
        layers = [{"pred_logits": self._class_logits(i, class_input(s)), "pred_boxes": b}
                  for i, (s, b) in enumerate(zip(states, boxes))]
        if self.mask_head is not None:
            layers = self._add_masks(mask_features, content, reference, states, layers)
        if dn is not None:
            denoised = [{k: v[:, : dn.size] for k, v in layer.items() if k != "pred_masks" or self.config.dn_masks}
                        for layer in layers]
            out["dn"] = {**denoised[-1], "aux_outputs": denoised[:-1], "groups": dn.groups, "group_size": dn.group_size}
            layers = [{k: v[:, dn.size :] for k, v in layer.items()} for layer in layers]
        one2one_layers = [{k: v[:, :one2one] for k, v in layer.items()} for layer in layers]
        out.update(one2one_layers[-1])
        out["aux_outputs"] = one2one_layers[:-1]
        if one2many:
            many = [{k: v[:, one2one:] for k, v in layer.items()} for layer in layers]
            out["one2many"] = {**many[-1], "aux_outputs": many[:-1]}
        return out

    def _pose_outputs(self, content, reference, memory, shapes, valid_ratios, flat_mask, groups, out: dict) -> dict:
        """ED-Pose's decoding (dfx.detection.keypoints.pose_decode) laid out as forward's output."""
        expanded = [self.config.pose_groups]
        if len(groups) > 1:
            expanded.append(max(1, self.config.pose_groups * groups[1] // groups[0]))
        per_group = pose_decode(self.decoder, self.keypoint_head, self.config.box_layers, content, reference, memory,
                                shapes, valid_ratios, flat_mask, self._box_delta, self._class_logits, groups,
                                expanded)
        out.update(per_group[0][-1])
        out["aux_outputs"] = per_group[0][:-1]
        if len(per_group) > 1:
            out["one2many"] = {**per_group[1][-1], "aux_outputs": per_group[1][:-1]}
        return out


@torch.no_grad()
def postprocess(outputs: dict, sizes: Tensor, detections: int = DETECTIONS) -> list[dict]:
    """Top-``detections`` (query, class) pairs per image, boxes in pixels.

    outputs: {"pred_logits": [B, Q, K], "pred_boxes": [B, Q, 4] cxcywh in [0, 1]}; sizes [B, 2]
    (height, width) to scale to. Returns per image {"scores": [D], "labels": [D], "boxes": [D, 4]
    xyxy, "queries": [D] the query each comes from}. A query may appear with several classes, as in
    Deformable-DETR's evaluation.
    """
    from torchvision.ops import box_convert

    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    batch, queries, classes = logits.shape
    scores, index = logits.sigmoid().flatten(1).topk(min(detections, queries * classes), dim=1)
    query, labels = index // classes, index % classes
    picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
    height, width = sizes.unbind(-1)
    scale = torch.stack((width, height, width, height), -1)[:, None].to(picked.dtype)
    xyxy = box_convert(picked, "cxcywh", "xyxy") * scale
    return [{"scores": s, "labels": l, "boxes": b, "queries": q} for s, l, b, q in zip(scores, labels, xyxy, query)]
