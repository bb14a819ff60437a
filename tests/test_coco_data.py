"""COCO-format detection data: DETR transforms, padding collate, CocoDetection and its input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dfx.data.coco import CocoDetection
from dfx.data.formats import find_detection_data
from dfx.data.det_transforms import DetectionTransform, collate_detection, resized_shape
from dfx.errors import UsageError

IDENTITY = {"mean": (0, 0, 0), "std": (1, 1, 1)}  # pixel values in [0, 1] stay readable after the transform


def target_of(boxes, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
            "image_id": 7, "orig_size": torch.tensor([0, 0]), "size": torch.tensor([0, 0])}


def to_xyxy(boxes: torch.Tensor, size) -> torch.Tensor:
    """Normalised cxcywh -> absolute xyxy in an image of ``size`` (h, w)."""
    h, w = (int(s) for s in size)
    cx, cy, bw, bh = (boxes * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


# --- transforms -----------------------------------------------------------------------------------


def test_flip_mirrors_box_and_normalises_to_cxcywh():
    image = Image.new("RGB", (200, 100))  # w x h
    transform = DetectionTransform(train=True, scales=[100], max_size=1000, hflip=1.0, **IDENTITY)
    tensor, target = transform(image, target_of([[10, 20, 30, 40]], [3]))
    assert tensor.shape == (3, 100, 200)
    assert target["size"].tolist() == [100, 200]
    # flipped: x in [170, 190]; cxcywh / (w, h, w, h)
    assert torch.allclose(target["boxes"], torch.tensor([[180 / 200, 30 / 100, 20 / 200, 20 / 100]]))
    assert target["labels"].tolist() == [3] and target["image_id"] == 7


def test_resize_caps_longer_side_at_max_size():
    assert resized_shape(100, 200, 200, 300) == (150, 300)  # shorter 200 would make the longer 400
    assert resized_shape(100, 200, 50, 300) == (50, 100)
    # DETR's rounding: the longer side truncated (480 x 640.8 -> 640), a capped shorter side rounded
    assert resized_shape(375, 500, 480, 1333) == (480, 640) and resized_shape(333, 500, 800, 1333) == (800, 1201)
    assert resized_shape(427, 1280, 800, 1333) == (445, 1333)
    image = Image.new("RGB", (200, 100))
    transform = DetectionTransform(train=True, scales=[200], max_size=300, hflip=0.0, **IDENTITY)
    tensor, target = transform(image, target_of([[10, 20, 30, 40]], [0]))
    assert tensor.shape == (3, 150, 300) and target["size"].tolist() == [150, 300]
    assert torch.allclose(to_xyxy(target["boxes"], target["size"]), torch.tensor([[15.0, 30.0, 45.0, 60.0]]))


def test_eval_resizes_to_largest_scale():
    image = Image.new("RGB", (200, 100))
    tensor, target = DetectionTransform(train=False, scales=[50, 80], max_size=1000)(image, target_of([], []))
    assert tensor.shape == (3, 80, 160)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_normalisation_uses_mean_and_std():
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    tensor, _ = DetectionTransform(train=False, scales=[8], max_size=8, mean=(0.5, 0.5, 0.5),
                                   std=(0.5, 0.25, 0.2))(image, target_of([], []))
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, -2.0, -1.5]))


def test_boxes_follow_the_pixels_through_flip_and_crop():
    """Two filled rectangles; after every random flip + crop each surviving box is exactly its pixels."""
    pixels = np.zeros((60, 100, 3), dtype=np.uint8)  # h x w
    pixels[10:30, 30:50] = 255  # label 0: xyxy [30, 10, 50, 30]
    pixels[35:55, 70:96] = 128  # label 1: xyxy [70, 35, 96, 55]
    image = Image.fromarray(pixels)
    # crop 40x40 and shorter side 40: no resize after the crop, so pixels stay exact
    transform = DetectionTransform(train=True, scales=[40], max_size=1000, crop=[40, 40], crop_prob=1.0, **IDENTITY)
    outcomes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        tensor, target = transform(image, target_of([[30, 10, 50, 30], [70, 35, 96, 55]], [0, 1]))
        assert tensor.shape == (3, 40, 40)
        boxes = dict(zip(target["labels"].tolist(), to_xyxy(target["boxes"], target["size"]).tolist()))
        for label, value in ((0, 1.0), (1, 128 / 255)):
            ys, xs = np.nonzero(np.isclose(tensor[0].numpy(), value, atol=1e-3))
            visible = xs.size > 0
            outcomes.add((label, bool(visible)))
            if visible:
                expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert np.allclose(boxes[label], expected, atol=1e-4), (seed, label)
            else:
                assert label not in boxes, (seed, label)  # a box cut to no area is dropped with its label
    assert outcomes == {(0, True), (0, False), (1, True), (1, False)}


@pytest.mark.parametrize("crop_resize", [[400], None])
def test_the_crop_is_taken_from_the_image_resized_to_crop_resize(crop_resize):
    """DETR's schedule: shorter side to one of crop_resize (400), crop 384-600, then the scales. A
    100 px square at the centre of a 2000x1000 image is 40 px at the crop (100 px without resize)."""
    image = Image.new("RGB", (2000, 1000))
    transform = DetectionTransform(train=True, scales=[384], max_size=2000, crop=[384, 384], crop_prob=1.0,
                                   hflip=0.0, crop_resize=crop_resize, **IDENTITY)
    heights = set()
    for seed in range(20):
        torch.manual_seed(seed)
        tensor, target = transform(image, target_of([[950, 450, 1050, 550]], [0]))
        assert tensor.shape == (3, 384, 384)
        heights |= {round(float(h) * 384, 3) for h in target["boxes"][:, 3]}
    # resized first, the square always lies inside the crop's rows; else it is often cut or left out
    assert heights == {40.0} if crop_resize else 100.0 in heights and 40.0 not in heights


def test_random_scales_and_flips_vary_with_the_seed():
    image = Image.new("RGB", (64, 32))
    transform = DetectionTransform(train=True, scales=[16, 24, 32], max_size=1000)
    heights = set()
    for seed in range(30):
        torch.manual_seed(seed)
        heights.add(transform(image, target_of([[0, 0, 8, 8]], [0]))[0].shape[1])
    assert heights == {16, 24, 32}


def test_collate_pads_bottom_right_and_masks_padding():
    a, b = torch.ones(3, 4, 6), 2 * torch.ones(3, 5, 3)
    images, masks, targets = collate_detection([(a, {"image_id": 1}), (b, {"image_id": 2})])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and masks.dtype == torch.bool
    assert [t["image_id"] for t in targets] == [1, 2]
    assert torch.equal(images[0, :, :4, :6], a) and images[0, :, 4:].abs().sum() == 0
    assert torch.equal(images[1, :, :5, :3], b) and images[1, :, :, 3:].abs().sum() == 0
    assert not masks[0, :4, :6].any() and masks[0, 4:].all()
    assert not masks[1, :, :3].any() and masks[1, :, 3:].all()
    assert int(masks.sum()) == (30 - 24) + (30 - 15)


# --- CocoDetection -------------------------------------------------------------------------------


def write_coco(root, annotations=None, images=None, categories=None, files=("a.png", "b.png", "c.png")):
    """A tiny COCO root: 3 images (b has no boxes), categories 2, 9, 5 (not contiguous, not sorted)."""
    (root / "images").mkdir(exist_ok=True)
    sizes = {"a.png": (40, 30), "b.png": (20, 20), "c.png": (30, 30)}
    for name in files:
        Image.new("RGB", sizes[name], (10, 20, 30)).save(root / "images" / name)
    images = images if images is not None else [
        {"id": i, "file_name": n, "width": sizes[n][0], "height": sizes[n][1]} for i, n in enumerate(sizes, 1)]
    categories = categories if categories is not None else [
        {"id": 2, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 5, "name": "bird"}]
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 9, "bbox": [5, 6, 10, 8], "iscrowd": 0, "area": 80},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "iscrowd": 0, "area": 16},
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [1, 1, 30, 20], "iscrowd": 1, "area": 600},
        {"id": 4, "image_id": 3, "category_id": 5, "bbox": [25, 25, 10, 10], "iscrowd": 0, "area": 100},
    ]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root / "images", ann_file


def test_labels_are_contiguous_in_sorted_id_order_and_map_back(tmp_path):
    dataset = CocoDetection(*write_coco(tmp_path))
    assert dataset.category_ids == [2, 5, 9] and dataset.classes == ["cat", "bird", "dog"]
    assert [dataset.label_to_category(i) for i in range(3)] == [2, 5, 9]
    assert dataset.ids == [1, 2, 3] and len(dataset) == 3 and dataset.skipped == {}
    image, target = dataset[0]
    assert image.size == (40, 30)
    assert target["labels"].tolist() == [2, 0]  # dog, cat; the crowd box is not a target
    assert target["boxes"].tolist() == [[5, 6, 15, 14], [0, 0, 4, 4]]
    assert target["image_id"] == 1 and target["orig_size"].tolist() == [30, 40]
    assert len(dataset.coco.anns) == 4  # the crowd stays in the ground truth for COCOeval


def test_image_without_boxes_is_kept_and_overhang_is_clipped(tmp_path):
    dataset = CocoDetection(*write_coco(tmp_path))
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    _, clipped = dataset[2]
    assert clipped["boxes"].tolist() == [[25, 25, 30, 30]] and clipped["labels"].tolist() == [1]


def test_given_category_order_sets_the_labels(tmp_path):
    dataset = CocoDetection(*write_coco(tmp_path), category_ids=[9, 2, 5])
    assert dataset.classes == ["dog", "cat", "bird"]
    assert dataset[0][1]["labels"].tolist() == [0, 1]
    with pytest.raises(UsageError, match=r"data.category_ids: 4 not among the categories"):
        CocoDetection(*write_coco(tmp_path), category_ids=[2, 4])


def test_transform_gets_absolute_boxes_and_returns_normalised(tmp_path):
    transform = DetectionTransform(train=False, scales=[60], max_size=1000)
    tensor, target = CocoDetection(*write_coco(tmp_path), transform=transform)[0]
    assert tensor.shape == (3, 60, 80)
    assert torch.allclose(target["boxes"][0], torch.tensor([10 / 40, 10 / 30, 10 / 40, 8 / 30]))
    assert target["size"].tolist() == [60, 80] and target["orig_size"].tolist() == [30, 40]


def bad(annotation: dict) -> list[dict]:
    good = {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "iscrowd": 0}
    return [good, {"iscrowd": 0, **annotation}]


def test_unknown_category_is_a_usage_error_naming_ids_file_and_fix(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, annotations=bad({"id": 2, "image_id": 1, "category_id": 11,
                                                                "bbox": [1, 1, 2, 2]}))
    with pytest.raises(UsageError) as error:
        CocoDetection(image_dir, ann_file)
    message = str(error.value)
    assert "11" in message and str(ann_file) in message
    assert "data.category_ids" in message and "data.skip_invalid: true" in message


def test_non_positive_box_is_a_usage_error(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, annotations=bad({"id": 42, "image_id": 1, "category_id": 2,
                                                                "bbox": [1, 1, 0, 5]}))
    with pytest.raises(UsageError, match=r"1 annotations .* non-positive width or height, or outside their image "
                                         r"\(annotation ids 42"):
        CocoDetection(image_dir, ann_file)
    image_dir, ann_file = write_coco(tmp_path, annotations=bad({"id": 43, "image_id": 1, "category_id": 2,
                                                                "bbox": [-5, 1, 5, 5]}))  # ends at x = 0
    with pytest.raises(UsageError, match=r"\(annotation ids 43"):
        CocoDetection(image_dir, ann_file)


def test_missing_image_files_are_reported_at_construction(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, files=("a.png", "b.png"))
    with pytest.raises(UsageError, match=r"1 of 3 images listed in .* are missing from .*images: c.png"):
        CocoDetection(image_dir, ann_file)


@pytest.mark.parametrize("content, expected", [
    ('{"images": [], "annotations": [], "categories": []}', "empty annotation file"),
    ("{}", "empty annotation file"),
    ("{not json", "is not valid JSON"),
    ('{"images": [{"id": 1}]}', "lack 'id' or 'file_name'"),
])
def test_empty_or_broken_annotation_file_is_a_usage_error(tmp_path, content, expected):
    image_dir, ann_file = write_coco(tmp_path)
    ann_file.write_text(content)
    with pytest.raises(UsageError, match=expected) as error:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(error.value)


def test_missing_annotation_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_skip_invalid_drops_and_counts(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 11, "bbox": [1, 1, 2, 2], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, -1], "iscrowd": 0},
        {"id": 6, "image_id": 1, "category_id": 9, "bbox": [40, 1, 2, 2], "iscrowd": 0},  # right of the 40-px image
        {"id": 4, "image_id": 3, "category_id": 9, "bbox": [1, 1, 2, 2], "iscrowd": 0},  # its image is missing
        {"id": 5, "image_id": 99, "category_id": 9, "bbox": [1, 1, 2, 2], "iscrowd": 0},
    ]
    image_dir, ann_file = write_coco(tmp_path, annotations=annotations, files=("a.png", "b.png"))
    dataset = CocoDetection(image_dir, ann_file, skip_invalid=True)
    assert dataset.skipped == {"missing image file": 1, "unknown category": 1, "invalid box": 2,
                               "unknown image id": 1}
    assert dataset.ids == [1, 2] and sorted(dataset.coco.anns) == [1]
    assert dataset[0][1]["labels"].tolist() == [0]
    summary = dataset.skip_summary()
    assert "\n" not in summary and "1 (missing image file)" in summary and "1 (unknown category)" in summary
    (tmp_path / "ok").mkdir()
    assert CocoDetection(*write_coco(tmp_path / "ok")).skip_summary() == ""


def test_missing_or_repeated_annotation_ids_are_renumbered(tmp_path):
    annotations = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4]},
                   {"image_id": 1, "category_id": 9, "bbox": [5, 5, 4, 4]},
                   {"id": 1, "image_id": 3, "category_id": 9, "bbox": [1, 1, 4, 4]},
                   {"id": 1, "image_id": 3, "category_id": 5, "bbox": [2, 2, 4, 4]}]
    dataset = CocoDetection(*write_coco(tmp_path, annotations=annotations))
    assert sorted(dataset.coco.anns) == [1, 2, 3, 4]  # pycocotools would have kept one box per id
    assert dataset[0][1]["labels"].tolist() == [0, 2] and dataset[2][1]["labels"].tolist() == [2, 1]


def test_both_coco_layouts_are_recognised(tmp_path):
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text("{}")
    found = find_detection_data(tmp_path / "coco")
    assert found.format == "coco" and (found.split("val").images, found.split("val").ann_file) == (
        tmp_path / "coco" / "val2017", tmp_path / "coco" / "annotations" / "instances_val2017.json")
    (tmp_path / "dfx" / "train").mkdir(parents=True)
    (tmp_path / "dfx" / "annotations").mkdir()
    (tmp_path / "dfx" / "annotations" / "train.json").write_text("{}")
    found = find_detection_data(tmp_path / "dfx")
    assert found.format == "dfx" and (found.split("train").images, found.split("train").ann_file) == (
        tmp_path / "dfx" / "train", tmp_path / "dfx" / "annotations" / "train.json")
    with pytest.raises(UsageError, match=r"coco \(coco\) has no train split \(it has val\)"):
        find_detection_data(tmp_path / "coco").split("train")
    with pytest.raises(UsageError, match="does not exist"):
        find_detection_data(tmp_path / "nowhere")
