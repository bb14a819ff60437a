"""GeminiFusion's released checkpoints (the reference code's layouts) mapped onto dfx's modules.

Two layouts exist, both read by :func:`dfx.weights.read_checkpoint` (``torch.load(weights_only=True)``):

- **NYUDv2 / SUN RGB-D** (``model-best.pth.tar``, ``mit-b3.pth.tar``): ``{"segmenter": state_dict,
  "epoch_start": int, "best_val": numpy scalar}``; the model was wrapped in DistributedDataParallel
  (``module.`` prefix) and is ``encoder`` (MiT) + ``decoder`` (SegFormer head) + ``alpha``.
- **DeLiVER** (``*.pth``): a bare state dict ``backbone.*``, ``decode_head.*``, ``alpha``, with the
  extra-modality merge ``backbone.extra_score_predictor.<stage>.score_nets.<k>`` when there are
  more than two modalities.

In both, layers shared by the modalities are wrapped (``q.module.weight``), the per-modality
LayerNorms are ``ln_<s>`` (dfx's names), and the fusion module's parameters sit in the attention
(``attn.cross_attn_0_to_1`` where dfx has ``attn.fusion.cross_attn_0_to_1``).
"""

from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor


# reference name -> dfx name, applied in order to every key
_RENAMES = [
    (re.compile(r"^encoder\."), "backbone."),
    (re.compile(r"^decoder\."), "decode_head."),
    (re.compile(r"^alpha$"), "ensemble_weights"),
    (re.compile(r"\.module\."), "."),  # ModuleParallel wrappers of the shared layers
    (re.compile(r"\.attn\.(cross_attn_0_to_1|cross_attn_1_to_0|relation_judger|k_noise|v_noise)\."),
     r".attn.fusion.\1."),
    (re.compile(r"^backbone\.extra_score_predictor\.(\d+)\."), lambda m: f"backbone.merge{int(m.group(1)) + 1}."),
]
_SCORE_NET = re.compile(r"^backbone\.merge\d\.score_nets\.(\d+)\.")
_INPUT_NORM = re.compile(r"^backbone\.patch_embed1\.norm\.ln_(\d+)\.weight$")


def dfx_name(key: str) -> str:
    """The dfx name of one reference key (``module.`` prefix already removed)."""
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def checkpoint_modalities(state: Mapping[str, Tensor]) -> int:
    """How many modality inputs a (dfx-named) state dict was trained on: its first LayerNorms."""
    return len([k for k in state if _INPUT_NORM.match(k)])


def _to_dfx(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    converted = {dfx_name(k): v for k, v in state.items()}
    # the reference builds one score net per modality but uses one per EXTRA modality: the last is dead
    modalities = checkpoint_modalities(converted)
    return {k: v for k, v in converted.items()
            if not ((m := _SCORE_NET.match(k)) and int(m.group(1)) >= modalities - 1)}


def _tensor_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def convert_nyudv2(checkpoint) -> dict[str, Tensor] | None:
    """A NYUDv2 / SUN RGB-D release (``{"segmenter": ...}``) in dfx's names, else None.

    ``checkpoint``: a dfx.weights.Checkpoint; its ``raw`` is what ``torch.load`` returned."""
    raw = checkpoint.raw
    if not isinstance(raw, Mapping) or not _tensor_dict(raw.get("segmenter")):
        return None
    keys = [k[len("module."):] if k.startswith("module.") else k for k in raw["segmenter"]]
    if not any(k.startswith("encoder.") for k in keys):
        return None
    return _to_dfx(raw["segmenter"])


convert_nyudv2.format_name = "GeminiFusion NYUDv2 / SUN RGB-D release"


def convert_deliver(checkpoint) -> dict[str, Tensor] | None:
    """A DeLiVER release (bare ``backbone.*`` / ``decode_head.*`` / ``alpha`` state dict) in dfx's names, else None."""
    raw = checkpoint.raw
    if not _tensor_dict(raw):
        return None
    keys = {k[len("module."):] if k.startswith("module.") else k for k in raw}
    if "alpha" not in keys or not any(k.startswith("backbone.block1.") for k in keys):
        return None
    return _to_dfx(raw)


convert_deliver.format_name = "GeminiFusion DeLiVER release"

RELEASED_FORMATS = (
    (convert_nyudv2, '{"segmenter": state_dict, ...} with module.encoder.* / module.decoder.* / module.alpha'),
    (convert_deliver, "a bare state dict backbone.* / decode_head.* / alpha"),
)


def architecture(state: Mapping[str, Tensor]) -> dict:
    """What a dfx-named GeminiFusion state dict was built with: modalities, MiT sizes, decoder, classes."""
    depths = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[2]) for k in state if k.startswith(f"backbone.block{stage}.")}
        depths.append(max(blocks) + 1 if blocks else 0)
    widths = [tuple(state[f"backbone.patch_embed{i}.proj.weight"].shape)[0]
              if f"backbone.patch_embed{i}.proj.weight" in state else 0 for i in range(1, 5)]
    fuse = state.get("decode_head.linear_fuse.conv.weight")
    pred = state.get("decode_head.linear_pred.weight")
    return {"modalities": checkpoint_modalities(state), "depths": depths, "embed_dims": widths,
            "decoder_dim": tuple(fuse.shape)[0] if fuse is not None else None,
            "classes": tuple(pred.shape)[0] if pred is not None else None,
            "gemini": any(".attn.fusion.relation_judger." in k for k in state)}
