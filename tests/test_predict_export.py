"""dfx predict and dfx export on the real photos of ../shared/data (chess-pieces-coco, rgbd-samples).

The models are built from the repository's recipes with random weights and saved as dfx
checkpoints: what is pinned down is the pipeline (files written, boxes in the original image's
pixels, one JSON line per image, skipped non-images, ONNX outputs equal to PyTorch's).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfx.cli import app
from dfx.engine.checkpoint import save_weights
from dfx.engine.trainer import checkpoint_metadata
from dfx.errors import UsageError
from dfx.models import build
from shared_data import DATA

REPO = Path(__file__).resolve().parents[1]
CHESS = DATA / "chess-pieces-coco" / "test"
RGBD = DATA / "rgbd-samples"
needs_data = pytest.mark.skipif(not CHESS.is_dir() or not RGBD.is_dir(),
                                reason=f"real test data not found at {DATA} (the shared/ folder beside the repo)")


def checkpoint(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    """A dfx checkpoint of the recipe's model with its (seeded) random initial weights."""
    torch.manual_seed(0)
    resolved, task, model, _ = build(REPO / "recipes" / recipe, overrides)
    path = tmp_path / f"{Path(recipe).stem}.safetensors"
    save_weights(path, model.state_dict(), checkpoint_metadata(resolved, task, 0, {}))
    return path


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("det"), "hdetr-shapes.yaml", "model.num_classes=3",
                      "model.one2one_queries=10", "model.one2many_queries=20", "model.encoder_layers=1",
                      "model.decoder_layers=2", "data.scales=[96]", "data.max_size=128")


@pytest.fixture(scope="module")
def fusion(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("fusion"), "gemini-shapes.yaml", "data.classes=[bg,a,b,c]")


@needs_data
@pytest.mark.slow
def test_predict_detection_on_chess_photos(detector, tmp_path):
    photos = sorted(CHESS.glob("*.jpg"))[:3]
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    (folder / "notes.txt").write_text("not a picture")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    result = CliRunner().invoke(app, ["predict", str(detector), str(folder), "--conf", "0", "--batch", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 3 and summary["skipped"] == 2
    assert sorted(Path(s["file"]).name for s in summary["skipped_files"]) == ["broken.jpg", "notes.txt"]
    out = Path(summary["out"])
    assert out == Path("runs/predict/hdetr-shapes")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(line["file"]).name for line in lines] == [p.name for p in photos]
    for line in lines:
        assert (line["width"], line["height"]) == (2048, 1371)  # the photos' own size, not the 96 px input
        boxes = np.array([d["box"] for d in line["detections"]])
        assert len(boxes) == 30  # conf 0 keeps every (query, class) pair: 10 queries x 3 classes
        assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= 2048 and boxes[:, 3].max() <= 1371
        assert boxes[:, 2].max() > 1024 and boxes[:, 3].max() > 685  # scaled to the photo, not the input
        assert {d["class"] for d in line["detections"]} <= {"class_0", "class_1", "class_2"}
    coco = json.loads((out / "predictions.json").read_text())
    assert len(coco) == 90 and {r["image_id"] for r in coco} == {0, 1, 2}
    first = next(d for d in lines[1]["detections"])
    match = next(r for r in coco if r["image_id"] == 1 and round(r["score"], 5) == first["score"])
    x0, y0, x1, y1 = first["box"]
    assert match["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.02)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.stem + ".jpg" for p in photos)
    assert Image.open(out / "images" / f"{photos[0].stem}.jpg").size == (2048, 1371)

    again = CliRunner().invoke(app, ["predict", str(detector), str(photos[0]), "--json"])  # default conf 0.25
    summary = json.loads(again.stdout)
    assert summary["out"].endswith("hdetr-shapes-2") and summary["conf"] == 0.25
    kept = json.loads(Path(summary["results"]).read_text())["detections"]
    assert all(d["score"] >= 0.25 for d in kept)
    assert (out / "predictions.jsonl").is_file()  # the first run's files are untouched


@needs_data
@pytest.mark.slow
def test_predict_fusion_on_rgbd_pairs(fusion, tmp_path):
    result = CliRunner().invoke(app, ["predict", str(fusion), str(RGBD / "*_color.*"), "--modality",
                                      f"depth={RGBD / '*_depth.*'}", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 3 and summary["skipped"] == 0
    lines = [json.loads(line) for line in Path(summary["results"]).read_text().splitlines()]
    for line in lines:
        color, depth = (Path(f).name for f in line["files"])
        assert color.split("_")[0] == depth.split("_")[0] and "depth" in depth  # paired NYU/SUN/TUM
        label_map = np.asarray(Image.open(Path(summary["out"]) / line["label_map"]))
        assert label_map.shape == (line["height"], line["width"])
        assert set(np.unique(label_map)) <= {0, 1, 2, 3}
        assert sum(line["classes"].values()) == pytest.approx(1.0, abs=1e-4)
    assert (lines[0]["width"], lines[0]["height"]) == Image.open(RGBD / "NYU_color.ppm").size

    missing = CliRunner().invoke(app, ["predict", str(fusion), str(RGBD / "*_color.*")])
    assert missing.exit_code == 2 and "--modality depth=DIR" in missing.output


def test_predict_bad_input(detector, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(detector), str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output
    recipe = runner.invoke(app, ["predict", str(REPO / "recipes" / "hdetr-shapes.yaml"), str(tmp_path),
                                 "model.num_classes=3"])
    assert recipe.exit_code == 2 and "model.weights" in recipe.output
    with pytest.raises(UsageError, match="--conf"):
        from dfx.predict import predict

        predict(detector, [str(tmp_path)], conf=2.0)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists and is not empty; choose another --out"):
        predict(detector, [str(taken / "keep.txt")], out=taken)
    assert (taken / "keep.txt").read_text() == "mine" and not Path("runs").exists()


needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
                                reason='onnx / onnxruntime not installed (pip install "dfx[export]")')


@needs_onnx
@needs_data
@pytest.mark.slow
def test_export_detection_matches_pytorch_on_a_real_photo(detector, capsys):
    from dfx.export import export

    photo = sorted(CHESS.glob("*.jpg"))[0]
    result = export(detector, image=photo, dynamic_batch=True)
    check = result["check"]
    print("detection ONNX check:", check["per_output"])
    assert check["passed"] and check["max_abs_diff"] < 1e-3
    assert set(check["per_output"]) == {"pred_logits@batch1", "pred_boxes@batch1", "pred_logits@batch2",
                                        "pred_boxes@batch2"}
    assert result["inputs"] == {"images": [1, 3, 96, 96], "mask": [1, 96, 96]}
    import onnx as onnx_lib

    model = onnx_lib.load(result["file"])
    assert any(node.op_type == "GridSample" for node in model.graph.node)  # deformable attention, standard ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["dfx_classes"]) == ["class_0", "class_1", "class_2"]


@needs_onnx
@needs_data
@pytest.mark.slow
def test_export_fusion_and_cli(fusion):
    result = CliRunner().invoke(app, ["export", str(fusion), "--image", str(RGBD / "SUN_color.jpg"), "--modality",
                                      f"depth={RGBD / 'SUN_depth.png'}", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    print("fusion ONNX check:", summary["check"]["per_output"])
    assert summary["check"]["max_abs_diff"] < 1e-3 and summary["inputs"] == {"rgb": [1, 3, 64, 64],
                                                                               "depth": [1, 3, 64, 64]}
    bad = CliRunner().invoke(app, ["export", str(fusion), "--format", "tflite"])
    assert bad.exit_code == 2 and "onnx" in bad.output


@needs_onnx
@pytest.mark.slow
def test_export_classification_and_segmentation(tmp_path):
    from dfx.export import export

    for recipe, extra, logits in (("cls-shapes.yaml", [], [2, 6]), ("segmenter-shapes.yaml", [], [2, 6, 64, 64])):
        weights = checkpoint(tmp_path, recipe, "model.num_classes=6", *extra)
        result = export(weights, dynamic_batch=True)
        print(recipe, "ONNX check:", result["check"]["per_output"])
        assert result["check"]["passed"] and result["check"]["input"] == "seeded noise"
        import onnxruntime

        session = onnxruntime.InferenceSession(result["file"])
        assert list(session.run(None, {"images": np.zeros([2, *result["inputs"]["images"][1:]], np.float32)})[0]
                    .shape) == logits


@pytest.mark.slow
@needs_data
def test_predict_classification_and_segmentation_on_a_photo(tmp_path):
    from dfx.predict import predict

    photo = sorted(CHESS.glob("*.jpg"))[0]
    weights = checkpoint(tmp_path, "cls-shapes.yaml", "model.num_classes=6")
    result = predict(weights, [str(photo)], conf=0.0, quiet=True)
    line = json.loads(Path(result["results"]).read_text())
    scores = [t["score"] for t in line["top"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    assert Image.open(Path(result["pictures"]) / f"{photo.stem}.jpg").size == (2048, 1371)

    weights = checkpoint(tmp_path, "segmenter-shapes.yaml", "model.num_classes=6")
    everything = predict(weights, [str(photo)], quiet=True)
    confident = predict(weights, [str(photo)], conf=0.5, quiet=True)
    full, part = (np.asarray(Image.open(Path(r["labels"]) / f"{photo.stem}.png")) for r in (everything, confident))
    assert full.shape == (1371, 2048) and full.max() < 6  # every pixel labelled at conf 0
    # a random 6-class model is rarely 50% sure: those pixels become 255, the others keep their class
    assert (part == 255).any() and (part[part != 255] == full[part != 255]).all()


def test_fusion_files_pair_by_name_else_in_sorted_order():
    from dfx.predict import pair_modalities

    rgb = [Path("a/1.png"), Path("a/2.png")]
    assert pair_modalities(rgb, {"depth": [Path("d/2.png"), Path("d/1.png")]}, ["rgb", "depth"]) == \
        [[Path("a/1.png"), Path("d/1.png")], [Path("a/2.png"), Path("d/2.png")]]
    assert pair_modalities(rgb, {"depth": [Path("d/x.png"), Path("d/y.png")]}, ["rgb", "depth"])[1][1] == Path("d/y.png")
    with pytest.raises(UsageError, match="--modality depth: 1 files for 2 rgb images"):
        pair_modalities(rgb, {"depth": [Path("d/x.png")]}, ["rgb", "depth"])


def test_export_without_onnx_says_how_to_install(monkeypatch):
    import sys

    from dfx.export import require_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r'pip install "dfx\[export\]"'):
        require_onnx()


@needs_onnx
@pytest.mark.filterwarnings("ignore")  # the tracer's notes on frozen Python values
def test_exported_deformable_attention_runs_in_onnxruntime_with_float64_locations(tmp_path):
    """The exporter folds some float32 constants to float64 (linspace in the encoder's reference
    points at full size); GridSample in onnxruntime takes one dtype, so the op casts to value's."""
    import onnxruntime

    from dfx.ops import ms_deform_attn

    shapes = torch.tensor([[6, 5], [3, 3]])

    class Attention(torch.nn.Module):
        def forward(self, value, locations, weights):
            return ms_deform_attn(value, shapes, locations.double(), weights)

    generator = torch.Generator().manual_seed(0)
    value = torch.randn(2, 39, 2, 4, generator=generator)
    locations = torch.rand(2, 7, 2, 2, 3, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(2, 7, 2, 2, 3, generator=generator)
    path = tmp_path / "attention.onnx"
    torch.onnx.export(Attention(), (value, locations, weights), str(path), dynamo=False, opset_version=17,
                      input_names=["value", "locations", "weights"])
    got = onnxruntime.InferenceSession(str(path)).run(None, {"value": value.numpy(), "locations": locations.numpy(),
                                                             "weights": weights.numpy()})[0]
    expected = ms_deform_attn(value, shapes, locations, weights)
    assert got.dtype == np.float32 and np.abs(got - expected.numpy()).max() < 1e-5
