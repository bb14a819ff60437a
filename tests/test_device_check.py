"""benchmarks/device_check.py: the no-GPU answer, and its AMP training step on the CPU at toy size."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_0(device_check, capsys, tmp_path):
    assert device_check.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "device_check.json").exists()


def test_amp_step_of_a_paper_recipe_at_toy_size_is_finite(device_check):
    recipe = device_check.RECIPES / "hdetr.yaml"
    overrides = ["model.num_classes=80", *device_check.SMOKE_OVERRIDES["detection"]]
    result = device_check.amp_steps(recipe, overrides, torch.bfloat16, torch.device("cpu"), steps=2, batch=1)
    assert result["finite"] and len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert result["input"] == [96, 128] and result["step_s"] > 0
    table = device_check.markdown({"device": "cpu", "torch": torch.__version__, "total_s": 1.0, "checks": [],
                                   "amp": [result]})
    assert "| hdetr.yaml | bfloat16 | 96x128 | 1 | yes |" in table
