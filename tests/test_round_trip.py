"""dfx predict -> dfx eval --predictions gives the numbers of dfx eval RUN: the results carry the
dataset's image and category ids, and every command reads images with dfx.data.images.

The detector is a seeded random one whose classes are the chess export's (what is pinned down is the
numbering and the reading, not the accuracy).
"""

from __future__ import annotations

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
from dfx.models import build
from shared_data import DATA, needs

REPO = Path(__file__).resolve().parents[1]
CHESS = DATA / "chess-pieces-coco"
VALID = CHESS / "valid"


@pytest.fixture(scope="module")
def chess_detector(tmp_path_factory) -> Path:
    """A seeded Deformable-DETR with the chess classes, 64-96 px inputs."""
    torch.manual_seed(0)
    recipe, task, model, _ = build(REPO / "recipes" / "deformable-detr-shapes.yaml",
                                   [f"data.root={CHESS}", "model.one2one_queries=10", "model.encoder_layers=1",
                                    "model.decoder_layers=1", "data.scales=[64]", "data.max_size=96"], read_data=True)
    path = tmp_path_factory.mktemp("chess") / "chess.safetensors"
    save_weights(path, model.state_dict(), checkpoint_metadata(recipe, task, 0, {}))
    return path


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def entries(path: Path) -> list[tuple]:
    return sorted((r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"])
                  for r in json.loads(Path(path).read_text()))


@needs("chess-pieces-coco")
@pytest.mark.slow
def test_predict_then_eval_predictions_equals_eval_run(chess_detector, tmp_path):
    predicted = invoke("predict", chess_detector, VALID, "--conf", "0", "--out", tmp_path / "P")
    assert predicted["images"] == 58 and predicted["skipped"] == 0  # the annotation file is not an image
    assert "valid/_annotations.coco.json" in predicted["numbering"]["image_id"]
    scored = invoke("eval", "--predictions", predicted["predictions"], "--annotations",
                    VALID / "_annotations.coco.json")
    direct = invoke("eval", chess_detector)  # the recipe's val split: the same valid/ folder
    assert scored["metrics"] == direct["metrics"]  # all twelve numbers and every per-class AP
    assert scored["metrics"]["AR100"] > 0
    ours, theirs = entries(predicted["predictions"]), entries(direct["predictions"])
    assert [r[:3] for r in ours] == [r[:3] for r in theirs]  # same images, categories, boxes
    np.testing.assert_allclose([r[3] for r in ours], [r[3] for r in theirs], rtol=1e-5)  # batch-size rounding
    annotations = json.loads((VALID / "_annotations.coco.json").read_text())
    by_name = {im["file_name"]: im["id"] for im in annotations["images"]}
    lines = [json.loads(line) for line in Path(predicted["results"]).read_text().splitlines()]
    assert [line["image_id"] for line in lines] == [by_name[Path(line["file"]).name] for line in lines]


@needs("chess-pieces-coco")
def test_ids_come_from_the_given_annotations_by_file_and_class_name(chess_detector, tmp_path):
    """Image ids far from file order and category ids in another order than the classes."""
    photos = sorted(VALID.glob("*.jpg"))[:2]
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    real = json.loads((VALID / "_annotations.coco.json").read_text())
    names = [c["name"] for c in real["categories"]][::-1]
    mine = {"images": [{"id": 700 - i, "file_name": f"sub/{p.name}", "width": 2048, "height": 1371}
                       for i, p in enumerate(photos)],
            "categories": [{"id": 100 + i, "name": name} for i, name in enumerate(names)], "annotations": []}
    ann = tmp_path / "mine.json"
    ann.write_text(json.dumps(mine))
    free = invoke("predict", chess_detector, folder, "--conf", "0", "--out", tmp_path / "free")
    assert free["numbering"]["image_id"].startswith("the image's 0-based line")
    assert {r["image_id"] for r in json.loads(Path(free["predictions"]).read_text())} == {0, 1}
    numbered = invoke("predict", chess_detector, folder, "--conf", "0", "--annotations", ann, "--out", tmp_path / "N")
    results = json.loads(Path(numbered["predictions"]).read_text())
    assert {r["image_id"] for r in results} == {700, 699}
    category_of = {c["name"]: c["id"] for c in numbered["numbering"]["categories"]}
    assert category_of["black-knight"] == 100 + names.index("black-knight")
    lines = [json.loads(line) for line in Path(numbered["results"]).read_text().splitlines()]
    for line in lines:
        first = line["detections"][0]
        match = [r for r in results if r["image_id"] == line["image_id"] and round(r["score"], 5) == first["score"]]
        assert match and match[0]["category_id"] == category_of[first["class"]]

    stray = folder / "extra.jpg"
    Image.new("RGB", (32, 32)).save(stray)
    refused = CliRunner().invoke(app, ["predict", str(chess_detector), str(folder), "--annotations", str(ann),
                                       "--out", str(tmp_path / "R"), "--json"])
    assert refused.exit_code == 2 and "1 of 3 images are not listed" in refused.stdout and "extra.jpg" in refused.stdout
    assert len(refused.stdout.strip().splitlines()) == 1 and not (tmp_path / "R").exists()


def encodings(reference: np.ndarray, folder: Path) -> list[str]:
    """``reference`` (uint8 [H, W, 3] with at most 256 colours and a black top-left corner) written as
    8-bit RGB, RGBA (the black corner transparent over other colours), palette, CMYK and
    EXIF-rotated files; the grey of it as 8-bit and 16-bit greyscale. Returns the file names."""
    image = Image.fromarray(reference)
    image.save(folder / "a-rgb.png")
    rgba = np.dstack([reference, np.full(reference.shape[:2], 255, np.uint8)])
    rgba[:20, :30] = (200, 50, 90, 0)  # hidden colour under zero alpha: composited onto black, as in training
    Image.fromarray(rgba, "RGBA").save(folder / "b-rgba.png")
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    assert (np.asarray(palette.convert("RGB")) == reference).all()
    palette.save(folder / "c-palette.png")
    image.convert("CMYK").save(folder / "d-cmyk.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated by 90 degrees; displayed upright
    image.transpose(Image.Transpose.ROTATE_90).save(folder / "e-exif.png", exif=exif)
    grey = np.asarray(image.convert("L"))
    Image.fromarray(grey).save(folder / "f-grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "g-grey16.png")  # 65535 scale
    Image.fromarray(grey).convert("RGB").save(folder / "h-grey-rgb.png")
    return sorted(p.name for p in folder.iterdir())


@needs("chess-pieces-coco")
def test_identical_pixels_predict_identically_in_every_encoding(chess_detector, tmp_path):
    photo = Image.open(sorted(VALID.glob("*.jpg"))[0]).convert("RGB").resize((240, 160))
    reference = np.array(photo.quantize(colors=200).convert("RGB"))
    reference[:20, :30] = 0
    folder = tmp_path / "encodings"
    folder.mkdir()
    names = encodings(reference, folder)
    summary = invoke("predict", chess_detector, folder, "--conf", "0", "--batch", "1", "--out", tmp_path / "P")
    assert summary["images"] == len(names) == 8 and summary["skipped"] == 0
    lines = {Path(line["file"]).name: line for line in
             map(json.loads, Path(summary["results"]).read_text().splitlines())}
    assert all((line["width"], line["height"]) == (240, 160) for line in lines.values())
    for colour in ("b-rgba.png", "c-palette.png", "d-cmyk.tif", "e-exif.png"):
        assert lines[colour]["detections"] == lines["a-rgb.png"]["detections"], colour
    for grey in ("f-grey8.png", "g-grey16.png"):
        assert lines[grey]["detections"] == lines["h-grey-rgb.png"]["detections"], grey
    assert lines["h-grey-rgb.png"]["detections"] != lines["a-rgb.png"]["detections"]  # the check can fail
