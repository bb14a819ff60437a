"""Host reads of tensor values in a detector training step: each one stalls the host until a GPU
has finished its queue, so only the ones the step needs may stay.

:class:`HostReads` wraps every Python-level call that reads values back (item, tolist,
bool/int/float/index of a tensor, nonzero, a copy to the CPU) and counts it with the dfx function it
came from, in the forward and in the backward (custom autograd functions included). On CPU the same
calls run, so the count made here is the count a GPU step makes.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from dfx.detection import DeformableDETR, DetectorConfig, HungarianMatcher, SetCriterion
from dfx.ops import ms_deform_attn

DFX = str(Path(__file__).resolve().parents[1] / "dfx")
WATCHED = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                                             "nonzero", "cpu", "to")] + [(torch, "nonzero")]


def _to_cpu(args, kwargs) -> bool:
    """A copy named to the host: ``.to("cpu")``. Here every tensor is on the CPU, so a move to another
    tensor's device (``.to(logits.device)``, a copy to the compute device) must not count."""
    return any(isinstance(a, str) and torch.device(a).type == "cpu" for a in (*args[1:], kwargs.get("device")))


class HostReads:
    """Within ``with``: counts reads as (kind, "file:function" of the innermost dfx frame)."""

    def __enter__(self) -> "HostReads":
        self.reads: Counter = Counter()
        self._originals = [(owner, name, getattr(owner, name)) for owner, name in WATCHED]
        for owner, name, original in self._originals:
            setattr(owner, name, self._counting(original, name.strip("_")))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._originals:
            setattr(owner, name, original)

    def _counting(self, original, kind: str):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if kind != "to" or _to_cpu(args, kwargs):
                frame = sys._getframe(1)
                while frame is not None and not frame.f_code.co_filename.startswith(DFX):
                    frame = frame.f_back
                where = "outside dfx" if frame is None else \
                    f"{Path(frame.f_code.co_filename).relative_to(DFX)}:{frame.f_code.co_name}"
                self.reads["to(cpu)" if kind == "to" else kind, where] += 1
            return original(*args, **kwargs)

        return wrapper


TINY = dict(num_classes=3, backbone="resnet10t", frozen_bn=False, dim=32, heads=4, levels=4, points=2,
            encoder_layers=1, decoder_layers=2, ffn_dim=64, dropout=0.0, one2one_queries=5, two_stage=True,
            box_refine=True, mixed_query_selection=True, look_forward_twice=True)
TARGETS = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
           {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def _training_step(model, criterion, images, mask) -> tuple[torch.Tensor, dict]:
    loss, logs = criterion(model(images, mask, TARGETS), TARGETS)
    loss.backward()
    return loss, logs


def test_a_hybrid_denoising_training_step_reads_back_only_what_matching_needs():
    torch.manual_seed(0)
    model = DeformableDETR(DetectorConfig(**TINY, one2many_queries=6, dn_queries=8)).train()
    criterion = SetCriterion(3, one2many_k=2)
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 48:] = True
    with HostReads() as recorder:
        _, logs = _training_step(model, criterion, images, mask)
    assert "dn" in logs and "one2many" in logs and "enc" in logs  # every part of the step ran

    layers = TINY["decoder_layers"]
    matchings = 2 * layers + 1  # one-to-one and one-to-many on every decoder layer, the encoder proposals
    assert recorder.reads == Counter({
        ("to(cpu)", "detection/matcher.py:forward"): matchings,  # the cost matrix, for scipy
        ("bool", "detection/matcher.py:check_targets"): 1,  # the targets, checked once per batch
        ("tolist", "detection/criterion.py:forward"): 1,  # every logged number at once
    }), recorder.reads


def test_ms_deform_attn_reads_nothing_back_with_python_shapes():
    torch.manual_seed(0)
    sizes = [(6, 9), (3, 5)]
    value = torch.randn(2, sum(h * w for h, w in sizes), 2, 4, requires_grad=True)
    locations = torch.rand(2, 7, 2, 2, 3, 2, requires_grad=True)
    weights = torch.rand(2, 7, 2, 2, 3, requires_grad=True)
    with HostReads() as recorder:
        ms_deform_attn(value, sizes, locations, weights).sum().backward()
    assert recorder.reads == Counter()
    with HostReads() as recorder:  # the tensor form reads the shapes back, once per call
        ms_deform_attn(value, torch.tensor(sizes), locations, weights)
    assert recorder.reads == Counter({("tolist", "ops/ms_deform_attn.py:_level_sizes"): 1})


def test_the_public_matcher_still_checks_what_it_is_given():
    outputs = {"pred_logits": torch.zeros(2, 4, 3), "pred_boxes": torch.full((2, 4, 4), 0.5)}
    matcher = HungarianMatcher()
    bad_label = [TARGETS[0], {"labels": torch.tensor([3]), "boxes": TARGETS[1]["boxes"]}]
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in \[0, 2\], got values in \[3, 3\]"):
        matcher(outputs, bad_label)
    nan_box = [TARGETS[0], {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, float("nan"), 0.5, 0.5]])}]
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\] contains NaN"):
        matcher(outputs, nan_box)
    with pytest.raises(ValueError, match=r"^class_weight must be >= 0, got -1"):
        SetCriterion(3, class_weight=-1.0)
    with pytest.raises(ValueError, match=r"^one2many_k must be an integer >= 1, got 0"):
        SetCriterion(3, one2many_k=0)
    # the criterion checks once, before any matching
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in \[0, 2\]"):
        SetCriterion(3)(outputs, bad_label)
    # unchecked per-layer calls still refuse non-finite predictions, read on the CPU copy of the cost
    nan_logits = {**outputs, "pred_logits": outputs["pred_logits"].clone()}
    nan_logits["pred_logits"][0, 1, 2] = float("nan")
    with HostReads() as recorder, pytest.raises(ValueError, match="pred_logits contains NaN"):
        matcher(nan_logits, TARGETS, validate=False)
    assert recorder.reads[("to(cpu)", "detection/matcher.py:forward")] == 1
    with HostReads() as recorder:
        indices = matcher(outputs, TARGETS, validate=False)
    assert [len(q) for q, _ in indices] == [2, 1]
    assert recorder.reads == Counter({("to(cpu)", "detection/matcher.py:forward"): 1})
