"""The released DINO checkpoints, mapped onto :class:`~dfx.detection.detector.DeformableDETR`.

Two layouts, both ``torch.save({"model": state_dict, ...})``:

- **IDEA-Research/DINO** (``checkpoint0011_4scale.pth``; ``recipes/dino.yaml``): the
  Deformable-DETR names of :mod:`dfx.detection.official` for the backbone, input projection and
  encoder/decoder layers, plus ``transformer.decoder.ref_point_head`` and
  ``transformer.decoder.norm``, ``transformer.tgt_embed`` (the content queries),
  ``transformer.enc_out_{class,bbox}_embed`` (the encoder's heads), ``label_enc`` (the denoising
  label embedding, one row per category id plus one: 92) and one class / box head shared by the
  decoder layers, stored under every ``class_embed.<i>`` / ``bbox_embed.<i>`` and again under
  ``transformer.decoder.``. Class heads have one row per COCO category id (91).
- **detrex** (``dino_r50_4scale_12ep.pth``; ``recipes/dino-detrex.yaml``): detectron2's ResNet
  (``backbone.stem.conv1``, ``backbone.res<s>.<b>.conv<k>[.norm]``, ``.shortcut[.norm]``), a
  ``neck`` (ChannelMapper: ``convs.<l>.{conv,norm}``, ``extra_convs.<j>.{conv,norm}``), detrex's
  layer names (``attentions.0`` / ``.1``, ``ffns.0.layers.{0.0,1}``, ``norms.<k>``),
  ``transformer.level_embeds``, per-layer heads ``class_embed.<i>`` / ``bbox_embed.<i>`` with the
  encoder's at index ``decoder_layers``; classes are the 80 contiguous COCO classes.

Keys the mapping does not know pass through unchanged, so a strict load names them.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from dfx.detection import official
from dfx.detection.detector import DetectorConfig
from dfx.errors import UsageError

FORMAT = ("a DINO checkpoint (IDEA-Research/DINO's checkpoint*.pth or detrex's dino_*.pth, "
          "torch.save({'model': state_dict, ...}))")

_LAYER_RULES = [rule for rule in official._RENAMES if rule[0].startswith(("encoder.layers", "decoder.layers"))]
_SHARED_RULES = [
    ("decoder.ref_point_head.", "transformer.decoder.ref_point_head."),
    ("decoder.norm.", "transformer.decoder.norm."),
    ("content_queries.", "transformer.tgt_embed."),
    ("enc_output.", "transformer.enc_output."),
    ("enc_output_norm.", "transformer.enc_output_norm."),
]
# dfx prefix <-> reference prefix, {i} a layer index (as in dfx.detection.official)
DINO_RULES = [
    ("backbone.body.", "backbone.0.body."),
    ("input_proj.layers.{i}.", "input_proj.{i}."),
    ("level_embed", "transformer.level_embed"),
    *_LAYER_RULES,
    *_SHARED_RULES,
    ("enc_box_head.", "transformer.enc_out_bbox_embed."),
]
DETREX_RULES = [
    ("level_embed", "transformer.level_embeds"),
    ("encoder.layers.{i}.self_attn.", "transformer.encoder.layers.{i}.attentions.0."),
    ("encoder.layers.{i}.norm1.", "transformer.encoder.layers.{i}.norms.0."),
    ("encoder.layers.{i}.ffn.0.", "transformer.encoder.layers.{i}.ffns.0.layers.0.0."),
    ("encoder.layers.{i}.ffn.3.", "transformer.encoder.layers.{i}.ffns.0.layers.1."),
    ("encoder.layers.{i}.norm2.", "transformer.encoder.layers.{i}.norms.1."),
    ("decoder.layers.{i}.self_attn.", "transformer.decoder.layers.{i}.attentions.0.attn."),
    ("decoder.layers.{i}.norm1.", "transformer.decoder.layers.{i}.norms.0."),
    ("decoder.layers.{i}.cross_attn.", "transformer.decoder.layers.{i}.attentions.1."),
    ("decoder.layers.{i}.norm2.", "transformer.decoder.layers.{i}.norms.1."),
    ("decoder.layers.{i}.ffn.0.", "transformer.decoder.layers.{i}.ffns.0.layers.0.0."),
    ("decoder.layers.{i}.ffn.3.", "transformer.decoder.layers.{i}.ffns.0.layers.1."),
    ("decoder.layers.{i}.norm3.", "transformer.decoder.layers.{i}.norms.2."),
    *_SHARED_RULES,
]
_ALIASES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
# detectron2's ResNet names -> timm's (torchvision's): res<s> is layer<s-1>; a conv's norm is bn<k>
_D2_BLOCK = re.compile(r"^backbone\.res(\d)\.(\d+)\.(conv\d|shortcut)(\.norm)?\.(.+)$")
_D2_NECK = re.compile(r"^neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(.+)$")


def layout(raw: object) -> str | None:
    """``"dino"`` (IDEA-Research/DINO), ``"detrex"``, or None for any other file."""
    state = raw.get("model") if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or "transformer.decoder.ref_point_head.layers.0.weight" not in state:
        return None
    if "transformer.level_embeds" in state:
        return "detrex"
    return "dino" if "transformer.level_embed" in state else None


def _detectron2_backbone(key: str) -> str | None:
    if key.startswith("backbone.stem.conv1."):
        rest = key[len("backbone.stem.conv1."):]
        return "backbone.body." + (f"bn1.{rest[len('norm.'):]}" if rest.startswith("norm.") else f"conv1.{rest}")
    match = _D2_BLOCK.match(key)
    if match is None:
        return None
    stage, block, conv, norm, rest = match.groups()
    if conv == "shortcut":
        module = "downsample.1" if norm else "downsample.0"
    else:
        module = conv.replace("conv", "bn") if norm else conv
    return f"backbone.body.layer{int(stage) - 1}.{block}.{module}.{rest}"


def _neck(key: str, first_extra: int) -> str | None:
    match = _D2_NECK.match(key)
    if match is None:
        return None
    kind, index, part, rest = match.groups()
    level = int(index) + (first_extra if kind == "extra_convs" else 0)
    return f"input_proj.layers.{level}.{0 if part == 'conv' else 1}.{rest}"


def _check_architecture(state: Mapping[str, Tensor], config: DetectorConfig, kind: str) -> None:
    """DINO's switches must be on in the recipe: the checkpoint's modules exist only then."""
    need = {"two_stage": True, "box_refine": True, "mixed_query_selection": "transformer.tgt_embed.weight" in state,
            "query_position": "per_layer", "decoder_norm": True, "two_stage_scoring": "class_aware"}
    decoder_heads = [k for k in state if re.match(rf"^(class|bbox)_embed\.([0-9]|[1-9][0-9])\.", k)
                     and int(k.split(".")[1]) < config.decoder_layers]
    if not all(torch.equal(state[k], state[re.sub(r"^(\w+)\.\d+\.", r"\1.0.", k)]) for k in decoder_heads):
        need["shared_heads"] = False  # a head per decoder layer (detrex; IDEA-Research/DINO shares one)
    wrong = [f"model.{name}={str(value).lower()}" for name, value in need.items() if getattr(config, name) != value]
    if wrong:
        recipe = "recipes/dino.yaml" if kind == "dino" else "recipes/dino-detrex.yaml"
        raise UsageError(f"the checkpoint is a DINO one ({'IDEA-Research/DINO' if kind == 'dino' else 'detrex'} "
                         f"layout): use {recipe} or set {' '.join(wrong)}")


def _detrex_rows(weight: Tensor, classes: int, key: str) -> Tensor:
    if weight.shape[0] != classes:
        raise UsageError(f"{key} has {weight.shape[0]} rows (detrex's contiguous COCO classes) and the recipe has "
                         f"{classes} classes: keep recipes/dino-detrex.yaml's data.classes / data.category_ids")
    return weight


def _label_book_rows(class_rows: Tensor, weight: Tensor, config: DetectorConfig,
                     category_ids: Sequence[int] | None, key: str) -> Tensor:
    """The denoising label embedding: the classes' rows, then (``model.dn_label_book`` larger than the
    classes) the rows of the label-book ids that are no class, in id order."""
    book = config.dn_label_book
    if book <= config.num_classes:
        return class_rows
    if book > weight.shape[0]:
        raise UsageError(f"model.dn_label_book={book} but {key} has {weight.shape[0]} rows: set "
                         f"model.dn_label_book to at most {weight.shape[0]}")
    classes = set(category_ids) if category_ids is not None else set(range(config.num_classes))
    others = [i for i in range(book) if i not in classes]
    return torch.cat((class_rows, weight[torch.as_tensor(others, dtype=torch.long)]))


def to_dfx(state: Mapping[str, Tensor], config: DetectorConfig, category_ids: Sequence[int] | None = None,
           kind: str = "dino") -> dict[str, Tensor]:
    """A released DINO state dict (``kind`` "dino" or "detrex") -> dfx's layout for ``config``."""
    _check_architecture(state, config, kind)
    layers = config.decoder_layers
    rules = [(ref, ours) for ours, ref in (DINO_RULES if kind == "dino" else DETREX_RULES)]
    first_extra = len({k.split(".")[2] for k in state if k.startswith("neck.convs.")})

    def rows(value: Tensor, key: str) -> Tensor:
        if kind == "detrex":
            return _detrex_rows(value, config.num_classes, key)
        return official._class_rows(value, category_ids, config.num_classes, key)

    out: dict[str, Tensor] = {}
    for key, value in state.items():
        value = value if isinstance(value, Tensor) else torch.as_tensor(value)
        if key.startswith(_ALIASES):
            continue  # the decoder's second registration of the heads
        head = _HEAD.match(key)
        if head is not None:
            what, index, rest = head.group(1), int(head.group(2)), head.group(3)
            prefix = "class_heads" if what == "class_embed" else "box_heads"
            if index == layers and kind == "detrex":
                name = ("enc_class_head." if what == "class_embed" else "enc_box_head.") + rest
            elif index < layers and not (config.shared_heads and index > 0):
                name = f"{prefix}.{index}.{rest}"
            elif index < layers:
                continue  # the shared head, stored again under every layer index
            else:
                out[key] = value
                continue
            out[name] = rows(value, key) if what == "class_embed" else value
        elif key.startswith("transformer.enc_out_class_embed."):
            out["enc_class_head." + key.rsplit(".", 1)[1]] = rows(value, key)
        elif key == "label_enc.weight":
            out["dn_label_embed.weight"] = _label_book_rows(rows(value, key), value, config, category_ids, key)
        else:
            name = (_detectron2_backbone(key) or _neck(key, first_extra)) if kind == "detrex" else None
            out[name or official._rename(key, rules) or key] = value
    return out


def converter(config: DetectorConfig, category_ids: Sequence[int] | None) -> Callable:
    """A :func:`dfx.weights.load_model_weights` converter for both released DINO layouts."""

    def convert(checkpoint) -> dict | None:
        kind = layout(checkpoint.raw)
        if kind is None:
            return None
        return to_dfx(checkpoint.raw["model"], config, category_ids, kind)

    convert.format_name = "dino"
    return convert
