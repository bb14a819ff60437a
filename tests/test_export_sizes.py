"""dfx export of the detector at non-square and odd sizes passes its own onnxruntime check.

The encoder's reference points were made with ``torch.linspace(0.5, n - 0.5, n)``, which the
TorchScript ONNX exporter turns into a division by ``n - 1``: NaN on a 1-pixel level (a 64 x 128
input has a 1 x 2 last level), and onnxruntime then differed from PyTorch by up to 0.87.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfx.cli import app
from dfx.detection.transformer import Encoder
from dfx.engine.checkpoint import save_weights
from dfx.engine.trainer import checkpoint_metadata
from dfx.models import build

REPO = Path(__file__).resolve().parents[1]
needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
                                reason='onnx / onnxruntime not installed (pip install "dfx[export]")')


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    recipe, task, model, _ = build(REPO / "recipes" / "hdetr-shapes.yaml",
                                   ["model.num_classes=3", "model.one2one_queries=10", "model.one2many_queries=20",
                                    "model.encoder_layers=1", "model.decoder_layers=2", "data.scales=[96]",
                                    "data.max_size=128"])
    path = tmp_path_factory.mktemp("det") / "det.safetensors"
    save_weights(path, model.state_dict(), checkpoint_metadata(recipe, task, 0, {}))
    return path


def test_reference_points_are_pixel_centres_at_every_level_size():
    ratios = torch.ones(1, 3, 2)
    points = Encoder.reference_points([(1, 2), (3, 1), (2, 2)], ratios)[0, :, 0]  # [S, 2] (x, y)
    expected = [(0.25, 0.5), (0.75, 0.5), (0.5, 1 / 6), (0.5, 0.5), (0.5, 5 / 6),
                (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    np.testing.assert_allclose(points.numpy(), expected, rtol=1e-6)


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("size", [(64, 128), (33, 47)], ids=["64x128", "33x47"])
def test_detector_exports_and_checks_at_non_square_and_odd_sizes(detector, tmp_path, size):
    result = CliRunner().invoke(app, ["export", str(detector), "--image-size", str(size[0]), "--image-size",
                                      str(size[1]), "--out", str(tmp_path / "x"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["inputs"]["images"] == [1, 3, *size] and summary["check"]["passed"]
    assert summary["check"]["max_abs_diff"] < 1e-4


@needs_onnx
def test_export_reads_the_image_as_training_does(detector, tmp_path):
    """--image goes through dfx.data.images: a 16-bit PNG is its 8-bit pixels, not white."""
    grey = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "deep.png")
    Image.fromarray(grey.astype(np.uint8)).convert("RGB").save(tmp_path / "flat.png")
    inputs = {}
    for name in ("deep", "flat"):
        from dfx.export import example_inputs

        recipe = build(detector)[0]
        inputs[name] = example_inputs(recipe, (48, 64), tmp_path / f"{name}.png")[1][0]
    assert torch.equal(inputs["deep"], inputs["flat"]) and inputs["flat"].std() > 0.5
