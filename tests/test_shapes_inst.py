"""The embedded instance-segmentation dataset shapes-inst: shapes-det's images with exact masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dfx.data.cache import tree_checksum
from dfx.data.coco import CocoDetection, decode_segmentations
from dfx.data.embedded import EMBEDDED
from dfx.data.formats import find_detection_data
from dfx.data.shapes_det import SIZE, generate_shapes_det
from dfx.data.shapes_inst import generate_shapes_inst, mask_box


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """shapes-inst and shapes-det with the same small splits."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes_inst(root / "inst", train_images=3, val_images=40)
    generate_shapes_det(root / "det", train_images=3, val_images=40)
    return root / "inst", root / "det"


def annotations(root, split="val"):
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def test_images_and_objects_are_shapes_det_s(pair):
    inst, det = pair
    for split in ("train", "val"):
        for file in sorted((det / split).iterdir()):
            assert (inst / split / file.name).read_bytes() == file.read_bytes()
    a, b = annotations(inst), annotations(det)
    assert a["images"] == b["images"] and a["categories"] == b["categories"]
    assert [(x["image_id"], x["category_id"]) for x in a["annotations"]] == \
        [(x["image_id"], x["category_id"]) for x in b["annotations"]]
    assert len(a["annotations"]) > 80


def test_each_mask_is_the_visible_part_of_its_shape(pair):
    """Masks are disjoint, each covers pixels of one flat colour (shapes are painted in one colour), keeps
    between half and all of the shape's full area (shapes-det's area), and its box and area are its own."""
    inst, det = pair
    full = {x["id"]: x["area"] for x in annotations(det)["annotations"]}
    by_image: dict[int, list[dict]] = {}
    for ann in annotations(inst)["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    hidden_some = 0
    for image_id, anns in by_image.items():
        pixels = np.asarray(Image.open(inst / "val" / f"{image_id - 1:06d}.png")).reshape(-1, 3)
        masks = decode_segmentations([a["segmentation"] for a in anns], SIZE, SIZE).astype(bool)
        assert masks.sum(0).max() == 1  # no pixel belongs to two objects
        for ann, mask in zip(anns, masks):
            colours = np.unique(pixels[mask.reshape(-1)], axis=0)
            assert len(colours) == 1, (image_id, ann["id"])
            assert ann["area"] == mask.sum() and 0.5 * full[ann["id"]] <= ann["area"] <= full[ann["id"]]
            hidden_some += ann["area"] < full[ann["id"]]
            assert ann["bbox"] == mask_box(mask) and ann["iscrowd"] == 0
    assert hidden_some >= 5  # occlusion happens, so visible masks differ from whole shapes


def test_mask_box_spans_first_to_past_last_pixel():
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == [3.0, 2.0, 6.0, 3.0]


def test_deterministic_and_loads_with_masks(pair, tmp_path):
    inst, _ = pair
    generate_shapes_inst(tmp_path / "again", train_images=3, val_images=40)
    assert tree_checksum(tmp_path / "again") == tree_checksum(inst)
    val = find_detection_data(inst).split("val")
    dataset = CocoDetection(val.images, val.ann_file, masks=True)
    _, target = dataset[0]
    first = [a for a in annotations(inst)["annotations"] if a["image_id"] == dataset.ids[0]]
    assert target["masks"].shape == (len(first), SIZE, SIZE)
    assert target["masks"].flatten(1).sum(1).tolist() == [a["area"] for a in first]


def test_registered_as_embedded():
    folder, generate = EMBEDDED["shapes-inst"]
    assert folder.startswith("shapes-inst-v") and generate is generate_shapes_inst


def test_data_check_counts_masks_and_flags_mask_problems(tmp_path):
    """dfx data check on shapes-inst: every object has a mask; then an empty polygon, one outside its image
    and an object without a mask are each named, the last fatal only for a masks recipe."""
    from typer.testing import CliRunner

    from dfx.cli import app

    root = tmp_path / "inst"
    generate_shapes_inst(root, train_images=4, val_images=3)
    result = CliRunner().invoke(app, ["data", "check", str(root), "--json"])
    report = json.loads(result.stdout)
    train = annotations(root, "train")
    assert result.exit_code == 0 and report["splits"]["train"]["masks"] == len(train["annotations"]) > 3
    assert not [p for p in report["problems"] if "mask" in p["kind"] or "polygon" in p["kind"]]
    first, second, third = train["annotations"][:3]
    first["segmentation"] = [[10, 10, 20, 10]]  # two points: no area
    second["segmentation"] = [[250, 250, 270, 250, 270, 262]]  # reaches past the 256 px image
    del third["segmentation"]
    (root / "annotations" / "train.json").write_text(json.dumps(train))
    report = json.loads(CliRunner().invoke(app, ["data", "check", str(root), "--json"]).stdout)
    problems = {p["kind"]: p for p in report["problems"] if p["split"] == "train"}
    assert problems["empty mask"]["count"] == 1 and f"ids {first['id']}" in problems["empty mask"]["detail"]
    assert problems["polygon outside image"]["count"] == 1 and not problems["missing mask"]["fatal"]
    assert report["splits"]["train"]["masks"] == len(train["annotations"]) - 1 and report["ok"]
    masks = CliRunner().invoke(app, ["data", "check", str(root), "model.masks=true", "model.two_stage=true",
                                     "--json"])
    assert masks.exit_code == 1 and any(p["kind"] == "missing mask" and p["fatal"]
                                        for p in json.loads(masks.stdout)["problems"])

