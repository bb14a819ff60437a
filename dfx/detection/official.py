"""The released Deformable-DETR / H-Deformable-DETR checkpoints, mapped onto :class:`DeformableDETR`.

The reference code saves ``torch.save({"model": state_dict, "args": Namespace, ...})``. Its key
layout differs from dfx's module by module:

====================================================  =============================================
reference                                             dfx
====================================================  =============================================
``backbone.0.body.*`` (torchvision ResNet, frozen BN)  ``backbone.body.*`` (timm, same names)
``input_proj.<l>.{0,1}.*``                            ``input_proj.layers.<l>.{0,1}.*``
``transformer.level_embed``                           ``level_embed``
``transformer.encoder.layers.<i>.``                   ``encoder.layers.<i>.``
    ``self_attn, norm1, linear1, linear2, norm2``         ``self_attn, norm1, ffn.0, ffn.3, norm2``
``transformer.decoder.layers.<i>.``                   ``decoder.layers.<i>.``
    ``self_attn, norm2`` (after self-attention)           ``self_attn, norm1``
    ``cross_attn, norm1`` (after cross-attention)         ``cross_attn, norm2``
    ``linear1, linear2, norm3``                           ``ffn.0, ffn.3, norm3``
``class_embed.<i>``, ``bbox_embed.<i>`` (i < layers)  ``class_heads.<i>``, ``box_heads.<i>``
``class_embed.<layers>``, ``bbox_embed.<layers>``     ``enc_class_head``, ``enc_box_head`` (two-stage)
``transformer.{enc_output,enc_output_norm}``          ``enc_output``, ``enc_output_norm``
``transformer.{pos_trans,pos_trans_norm}``            ``pos_trans``, ``pos_trans_norm``
``query_embed`` ([Q, 2C]; [Q, C] with mixed selection) ``query_embed``; ``content_queries``
``transformer.reference_points``                      ``reference_points``
====================================================  =============================================

The reference registers the decoder's heads a second time (``transformer.decoder.class_embed.*``,
``transformer.decoder.bbox_embed.*``) and, without box refinement, stores one shared head under
every index: those aliases are dropped. Its class heads have one row per COCO category id (91);
dfx's have one per recipe class, so row ``category_ids[k]`` becomes class ``k``. The encoder's
head is trained class-agnostically (every target relabelled 0): its row 0 is the objectness.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from dfx.detection.detector import DetectorConfig
from dfx.errors import UsageError

FORMAT = "a Deformable-DETR / H-Deformable-DETR checkpoint (torch.save({'model': state_dict, ...}), .pth)"
CATEGORY_ROWS = 91  # COCO category ids 0..90 index the released class heads

# dfx prefix <-> reference prefix; {i} is a layer index.
_RENAMES = [
    ("backbone.body.", "backbone.0.body."),
    ("input_proj.layers.{i}.", "input_proj.{i}."),
    ("level_embed", "transformer.level_embed"),
    ("encoder.layers.{i}.self_attn.", "transformer.encoder.layers.{i}.self_attn."),
    ("encoder.layers.{i}.norm1.", "transformer.encoder.layers.{i}.norm1."),
    ("encoder.layers.{i}.ffn.0.", "transformer.encoder.layers.{i}.linear1."),
    ("encoder.layers.{i}.ffn.3.", "transformer.encoder.layers.{i}.linear2."),
    ("encoder.layers.{i}.norm2.", "transformer.encoder.layers.{i}.norm2."),
    ("decoder.layers.{i}.self_attn.", "transformer.decoder.layers.{i}.self_attn."),
    ("decoder.layers.{i}.norm1.", "transformer.decoder.layers.{i}.norm2."),
    ("decoder.layers.{i}.cross_attn.", "transformer.decoder.layers.{i}.cross_attn."),
    ("decoder.layers.{i}.norm2.", "transformer.decoder.layers.{i}.norm1."),
    ("decoder.layers.{i}.ffn.0.", "transformer.decoder.layers.{i}.linear1."),
    ("decoder.layers.{i}.ffn.3.", "transformer.decoder.layers.{i}.linear2."),
    ("decoder.layers.{i}.norm3.", "transformer.decoder.layers.{i}.norm3."),
    ("class_heads.{i}.", "class_embed.{i}."),
    ("box_heads.{i}.", "bbox_embed.{i}."),
    ("enc_output.", "transformer.enc_output."),
    ("enc_output_norm.", "transformer.enc_output_norm."),
    ("pos_trans.", "transformer.pos_trans."),
    ("pos_trans_norm.", "transformer.pos_trans_norm."),
    ("reference_points.", "transformer.reference_points."),
    ("query_embed.", "query_embed."),
    ("content_queries.", "query_embed."),
]
_ALIASES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for source, target in rules:
        match = _pattern(source).match(key)
        if match:
            return target.replace("{i}", match.groupdict().get("i") or "") + key[match.end():]
    return None


def is_official(raw: object) -> bool:
    """True for a reference checkpoint: ``{"model": state_dict}`` with its transformer keys (and
    no DINO decoder: :mod:`dfx.detection.official_dino` reads those)."""
    state = raw.get("model") if isinstance(raw, Mapping) else None
    return (isinstance(state, Mapping) and any(str(k).startswith("transformer.") for k in state)
            and "transformer.decoder.ref_point_head.layers.0.weight" not in state)


def _class_rows(weight: Tensor, category_ids: Sequence[int] | None, classes: int, key: str) -> Tensor:
    """The rows of a released class head ([R] or [R, C]) for the recipe's classes, by category id."""
    rows = weight.shape[0]
    if category_ids is None:
        if classes != rows:
            raise UsageError(f"{key} has {rows} rows indexed by COCO category id and the recipe has {classes} "
                             "classes: set data.category_ids (the recipe's classes as category ids)")
        return weight
    if max(category_ids) >= rows:
        raise UsageError(f"data.category_ids: id {max(category_ids)} has no row in {key} ({rows} rows, one per "
                         "category id)")
    return weight[torch.as_tensor(list(category_ids), dtype=torch.long)]


def to_dfx(official: Mapping[str, Tensor], config: DetectorConfig,
           category_ids: Sequence[int] | None = None) -> dict[str, Tensor]:
    """A reference state dict -> dfx's layout for ``config``.

    Keys the mapping does not know are passed through unchanged, so a strict load names them.
    """
    _check_architecture(official, config)
    layers = config.decoder_layers
    renames = [(official_key, dfx_key) for dfx_key, official_key in _RENAMES]
    if config.two_stage and config.mixed_query_selection:
        renames = [r for r in renames if r != ("query_embed.", "query_embed.")]
    else:
        renames = [r for r in renames if r != ("query_embed.", "content_queries.")]
    state: dict[str, Tensor] = {}
    for key, value in official.items():
        head = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
        if key.startswith(_ALIASES):
            continue  # the decoder's second registration of the heads
        if head is None:
            state[_rename(key, renames) or key] = value
            continue
        kind, index, rest = head.group(1), int(head.group(2)), head.group(3)
        if config.two_stage and index == layers:
            name = ("enc_class_head." if kind == "class_embed" else "enc_box_head.") + rest
        elif index < layers and (config.box_refine or index == 0):
            name = ("class_heads." if kind == "class_embed" else "box_heads.") + f"{index}.{rest}"
        elif index < layers and torch.equal(value, official[f"{kind}.0.{rest}"]):
            continue  # one shared head stored under every index
        else:
            state[key] = value
            continue
        if kind == "class_embed":
            if name.startswith("enc_class_head.") and config.two_stage_scoring == "agnostic":
                value = value[:1]  # the objectness row
            else:
                value = _class_rows(value, category_ids, config.num_classes, key)
        state[name] = value
    return state


def _check_architecture(official: Mapping[str, Tensor], config: DetectorConfig) -> None:
    """The switches a checkpoint's keys reveal must be the recipe's (else no key maps to its module)."""
    found = {"two_stage": "transformer.enc_output.weight" in official,
             "box_refine": any(k.startswith("transformer.decoder.bbox_embed.") for k in official)}
    found["mixed_query_selection"] = found["two_stage"] and "query_embed.weight" in official
    found.update(query_position="proposal", decoder_norm=False, shared_heads=False)  # DINO's switches: off
    wrong = [f"model.{name}={str(value).lower()}" for name, value in found.items() if getattr(config, name) != value]
    if wrong:
        raise UsageError(f"the checkpoint is of another Deformable-DETR variant: set {' '.join(wrong)}")


def to_official(state: Mapping[str, Tensor], config: DetectorConfig, category_ids: Sequence[int] | None = None,
                rows: int = CATEGORY_ROWS) -> dict[str, Tensor]:
    """dfx's state dict -> the reference layout (heads with ``rows`` rows by category id, aliases included)."""
    if category_ids is None:
        category_ids = list(range(config.num_classes))
    layers, out = config.decoder_layers, {}
    rules = [*_RENAMES, ("enc_class_head.", f"class_embed.{layers}."), ("enc_box_head.", f"bbox_embed.{layers}.")]
    for key, value in state.items():
        name = _rename(key, rules)
        if name is None:
            raise ValueError(f"{key}: no counterpart in the reference layout")
        if key.startswith(("class_heads.", "enc_class_head.")):
            full = value.new_zeros((rows, *value.shape[1:]))
            if full.dim() == 1:
                full.fill_(-math.log((1 - 0.01) / 0.01))  # rows no class uses keep the prior
            ids = [0] if key.startswith("enc_class_head.") and value.shape[0] == 1 else list(category_ids)
            full[torch.as_tensor(ids, dtype=torch.long)] = value
            value = full
        out[name] = value
    heads = [k for k in out if re.match(r"^(class_embed|bbox_embed)\.\d+\.", k)]
    if not config.box_refine:  # one head under every decoder index
        for key in [k for k in heads if re.match(r"^(class_embed|bbox_embed)\.0\.", k)]:
            for index in range(1, layers):
                out[key.replace(".0.", f".{index}.", 1)] = out[key]
    if config.box_refine:
        for key in [k for k in out if k.startswith("bbox_embed.")]:
            out["transformer.decoder." + key] = out[key]
    if config.two_stage:
        for key in [k for k in out if k.startswith("class_embed.")]:
            out["transformer.decoder." + key] = out[key]
    return out


def converter(config: DetectorConfig, category_ids: Sequence[int] | None) -> Callable:
    """A :func:`dfx.weights.load_model_weights` converter for the released files."""

    def convert(checkpoint) -> dict | None:
        if not is_official(checkpoint.raw):
            return None
        return to_dfx(checkpoint.raw["model"], config, category_ids)

    convert.format_name = "deformable-detr"
    return convert


_HINTS = [
    (r"^(query_embed|content_queries)\.", "model.one2one_queries / model.one2many_queries"),
    (r"^enc_class_head\.", "model.two_stage_scoring"),
    (r"\.ffn\.[03]\.", "model.ffn_dim"),
    (r"\.(sampling_offsets|attention_weights)\.", "model.heads / model.levels / model.points"),
    (r"^level_embed$", "model.levels / model.dim"),
    (r"^backbone\.", "model.backbone / model.backbone_kwargs"),
    (r"^input_proj\.", "model.backbone / model.dim"),
    (r"^class_heads\.", "data.category_ids / model.num_classes"),
    (r"^dn_label_embed\.", "data.category_ids / model.num_classes"),
    (r"^decoder\.ref_point_head\.", "model.dim"),
]


def hint(key: str) -> str:
    """The recipe keys that decide the shape of dfx parameter ``key``."""
    for pattern, keys in _HINTS:
        if re.search(pattern, key):
            return keys
    return "model.dim"
