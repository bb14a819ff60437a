"""The embedded detection dataset shapes-det: determinism, statistics, and loading through CocoDetection."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dfx.data.cache import tree_checksum
from dfx.data.coco import CocoDetection
from dfx.data.formats import find_detection_data
from dfx.data.embedded import EMBEDDED
from dfx.data.shapes_det import CATEGORY_IDS, CLASSES, MAX_OBJECTS, SIZE, generate_shapes_det, polygon_mask, scene


@pytest.fixture(scope="module")
def full_val(tmp_path_factory):
    """The real val split (200 images, ~2 s) beside a 4-image train split."""
    root = tmp_path_factory.mktemp("shapes-det")
    generate_shapes_det(root, train_images=4, val_images=200)
    return root


def bucket(area: float) -> str:
    return "small" if area < 32 ** 2 else "large" if area > 96 ** 2 else "medium"


def test_generation_is_deterministic_and_prefix_stable(tmp_path, full_val):
    generate_shapes_det(tmp_path / "a", train_images=3, val_images=5)
    generate_shapes_det(tmp_path / "b", train_images=3, val_images=5)
    assert tree_checksum(tmp_path / "a") == tree_checksum(tmp_path / "b")
    # each image has its own random stream: the 5 images are the first 5 of the full split
    for index in range(5):
        name = f"val/{index:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (full_val / name).read_bytes()
    assert tree_checksum(tmp_path / "a") != tree_checksum(full_val)
    generate_shapes_det(tmp_path / "c", seed=1, train_images=3, val_images=5)
    assert (tmp_path / "c" / "val/000000.png").read_bytes() != (tmp_path / "a" / "val/000000.png").read_bytes()


def test_val_has_every_area_bucket_few_empty_images_and_noncontiguous_ids(full_val):
    document = json.loads((full_val / "annotations" / "val.json").read_text())
    assert [c["id"] for c in document["categories"]] == [1, 3, 5, 7] == list(CATEGORY_IDS)
    assert [c["name"] for c in document["categories"]] == list(CLASSES)
    assert len(document["images"]) == 200 and {"description", "version", "seed"} <= set(document["info"])
    annotations = document["annotations"]
    assert {a["category_id"] for a in annotations} == {1, 3, 5, 7}
    buckets = Counter(bucket(a["area"]) for a in annotations)
    assert min(buckets["small"], buckets["medium"], buckets["large"]) >= 20, buckets
    per_image = Counter(a["image_id"] for a in annotations)
    empty = [im["id"] for im in document["images"] if im["id"] not in per_image]
    assert 6 <= len(empty) <= 10  # every 32nd image by design (6 of 200), rarely one whose shapes found no room
    assert max(per_image.values()) <= MAX_OBJECTS and 2.5 <= len(annotations) / 200 <= MAX_OBJECTS
    assert len({a["id"] for a in annotations}) == len(annotations)
    for a in annotations:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
        assert w >= 8 and h >= 5  # the smallest shapes (radius 6.5 px) stay visible


def test_boxes_enclose_their_shapes_pixels():
    """A box is the shape's full extent: for a lone shape, the painted pixels fill it to within the
    1.5 px by which polygon rasterisation may paint beyond (or short of) the exact outline."""
    checked = 0
    for seed in range(40):
        pixels, objects = scene(np.random.default_rng([99, seed]))
        if len(objects) != 1:
            continue
        (_, (x, y, w, h), area), = objects
        background = np.asarray(Image.fromarray(pixels)).astype(int)
        # the shape is the region differing strongly from the background's median colour
        differs = np.abs(background - np.median(background.reshape(-1, 3), 0)).sum(-1) > 100
        ys, xs = np.nonzero(differs)
        assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5, seed
        assert abs(ys.min() - y) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5, seed
        assert area == pytest.approx(differs.sum(), rel=0.02), seed
        checked += 1
    assert checked >= 5, "too few single-shape scenes among 40 seeds"


def test_no_shape_is_more_than_half_hidden(monkeypatch):
    """Record every placed shape's mask: each keeps at least half of its pixels after later shapes."""
    from dfx.data import shapes_det

    masks: list[np.ndarray] = []
    original_place = shapes_det.place

    def recording_place(*args):
        placed = original_place(*args)
        if placed is not None:
            masks.append(placed[1])
        return placed

    monkeypatch.setattr(shapes_det, "place", recording_place)
    checked = 0
    for seed in range(15):
        masks.clear()
        scene(np.random.default_rng([7, seed]))
        for i, mask in enumerate(masks):
            covered = np.logical_or.reduce([np.zeros_like(mask), *masks[i + 1:]])
            assert (mask & ~covered).sum() >= 0.5 * mask.sum()
            checked += 1
    assert checked > 30


def test_polygon_mask_matches_drawn_pixels():
    from dfx.data.shapes import draw_shape, shape_polygon

    canvas = Image.new("RGB", (SIZE, SIZE))
    draw_shape(canvas, "triangle", 100.5, 80.5, 30, 0.3, (255, 255, 255))
    drawn = np.asarray(canvas)[..., 0] > 0
    assert np.array_equal(polygon_mask(shape_polygon("triangle", 100.5, 80.5, 30, 0.3)), drawn)


def test_loads_with_coco_detection(full_val):
    val = find_detection_data(full_val).split("val")
    image_dir, ann_file = val.images, val.ann_file
    dataset = CocoDetection(image_dir, ann_file)
    assert dataset.category_ids == [1, 3, 5, 7] and dataset.classes == list(CLASSES)
    assert len(dataset) == 200 and dataset.skipped == {}
    image, target = dataset[0]
    assert image.size == (SIZE, SIZE) and target["orig_size"].tolist() == [SIZE, SIZE]
    document = json.loads(ann_file.read_text())
    first = [a for a in document["annotations"] if a["image_id"] == dataset.ids[0]]
    assert target["labels"].tolist() == [CATEGORY_IDS.index(a["category_id"]) for a in first]
    assert np.allclose(target["boxes"].numpy(), [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in first)])
    train = find_detection_data(full_val).split("train")
    assert len(CocoDetection(train.images, train.ann_file)) == 4


def test_registered_as_embedded():
    folder, generate = EMBEDDED["shapes-det"]
    assert folder.startswith("shapes-det-v") and generate is generate_shapes_det
