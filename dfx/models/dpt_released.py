"""The released DPT checkpoints (isl-org/DPT: ``dpt_hybrid-midas-*.pt``, ``dpt_large-midas-*.pt``,
``dpt_hybrid_nyu-*.pt``, ``dpt_hybrid_kitti-*.pt``) in dfx.models.dpt's names, for ``model.weights``.

The release is a bare ``torch.save`` state dict of the reference's ``DPTDepthModel``:

=============================================  ==========================================
reference                                      dfx.models.dpt.DPT
=============================================  ==========================================
``pretrained.model.<timm ViT>``                ``backbone.<timm ViT>`` (the classifier head dropped)
``pretrained.act_postprocess<i>.0.project.0``  ``reassemble.<i-1>.readout.project.0`` (Linear(2C, C))
``pretrained.act_postprocess<i>.3``            ``reassemble.<i-1>.project`` (1x1 conv)
``pretrained.act_postprocess<i>.4``            ``reassemble.<i-1>.resample`` (ConvTranspose / stride-2 conv)
``scratch.layer<i>_rn``                        ``layer_rn.<i-1>``
``scratch.refinenet<i>.resConfUnit1``          ``fusion.<i-1>.skip_unit``
``scratch.refinenet<i>.resConfUnit2``          ``fusion.<i-1>.unit``
``scratch.refinenet<i>.out_conv``              ``fusion.<i-1>.project``
``scratch.output_conv.0`` / ``.2`` / ``.4``    ``head.conv1`` / ``head.conv2`` / ``head.out``
=============================================  ==========================================

The hybrid's first two taps have no reassembly (``act_postprocess1/2`` hold no weights). Segmentation
releases (``scratch.output_conv`` with ``auxlayer``) are not depth models: their head does not fit.
The releases' ``scale`` / ``shift`` / ``invert`` are constructor values, not tensors: for the NYUv2 and
KITTI models set ``model.output: inverse`` with their ``inverse_scale`` / ``inverse_shift``;
``dpt_hybrid-midas`` / ``dpt_large-midas`` are ``model.output: relative``.
"""

from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

_RULES = (
    (re.compile(r"^pretrained\.model\."), "backbone."),
    (re.compile(r"^pretrained\.act_postprocess(\d)\.0\.project\.0\."),
     lambda m: f"reassemble.{int(m[1]) - 1}.readout.project.0."),
    (re.compile(r"^pretrained\.act_postprocess(\d)\.3\."), lambda m: f"reassemble.{int(m[1]) - 1}.project."),
    (re.compile(r"^pretrained\.act_postprocess(\d)\.4\."), lambda m: f"reassemble.{int(m[1]) - 1}.resample."),
    (re.compile(r"^scratch\.layer(\d)_rn\."), lambda m: f"layer_rn.{int(m[1]) - 1}."),
    (re.compile(r"^scratch\.refinenet(\d)\.resConfUnit1\."), lambda m: f"fusion.{int(m[1]) - 1}.skip_unit."),
    (re.compile(r"^scratch\.refinenet(\d)\.resConfUnit2\."), lambda m: f"fusion.{int(m[1]) - 1}.unit."),
    (re.compile(r"^scratch\.refinenet(\d)\.out_conv\."), lambda m: f"fusion.{int(m[1]) - 1}.project."),
    (re.compile(r"^scratch\.output_conv\.0\."), "head.conv1."),
    (re.compile(r"^scratch\.output_conv\.2\."), "head.conv2."),
    (re.compile(r"^scratch\.output_conv\.4\."), "head.out."),
)


def dfx_name(key: str) -> str | None:
    """The dfx name of a released DPT tensor; None for what dfx's model does not hold (the ViT's
    classifier head)."""
    if key.startswith("pretrained.model.head."):
        return None
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key  # left as it is: the strict check names it


def convert_dpt(checkpoint) -> dict[str, Tensor] | None:
    """A released DPT state dict (``pretrained.model.*`` and ``scratch.*`` keys) in dfx's names, else None.

    ``checkpoint``: a dfx.weights.Checkpoint; its ``raw`` is what ``torch.load`` returned."""
    raw = checkpoint.raw
    for key in ("state_dict", "model"):  # a training checkpoint wrapping the model's state dict
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        return None
    keys = [k[len("module."):] if k.startswith("module.") else k for k in raw]
    if not any(k.startswith("pretrained.model.") for k in keys) or not any(k.startswith("scratch.") for k in keys):
        return None
    state = {}
    for key, value in zip(keys, raw.values()):
        name = dfx_name(key)
        if name is not None:
            state[name] = value
    return state


convert_dpt.format_name = "DPT release (isl-org/DPT)"
RELEASED_FORMAT = "a DPT release (isl-org/DPT: pretrained.model.* / pretrained.act_postprocess* / scratch.*)"
