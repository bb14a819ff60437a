"""COCO instance masks in the detection data: decoding, transforms that move them exactly, padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from dfx.data.coco import CocoDetection, decode_segmentations
from dfx.data.det_transforms import DetectionTransform, collate_detection
from dfx.errors import UsageError


def rectangle(height, width, top, left, bottom, right) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, by hand: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def test_polygons_and_both_rles_decode_to_their_masks():
    known = rectangle(20, 30, 4, 6, 12, 21)
    compressed = coco_mask.encode(np.asfortranarray(known))
    compressed["counts"] = compressed["counts"].decode()  # as JSON stores it
    # a polygon around the pixel block, and a second part far from it (a polygon's parts are merged)
    polygon = [[6, 4, 21, 4, 21, 12, 6, 12], [0, 16, 3, 16, 3, 19, 0, 19]]
    masks = decode_segmentations([uncompressed_rle(known), compressed, polygon], 20, 30)
    assert masks.shape == (3, 20, 30) and masks.dtype == np.uint8
    assert np.array_equal(masks[0], known) and np.array_equal(masks[1], known)
    # pycocotools rasterises a polygon's pixel corners: the block's 15x8 pixels, and the 3x3 part
    assert masks[2][4:12, 6:21].all() and masks[2][16:19, 0:3].all()
    assert masks[2].sum() == 15 * 8 + 3 * 3
    with pytest.raises(UsageError, match=r"RLE segmentation of size \[20, 30\] is on an image of 10x30"):
        decode_segmentations([compressed], 10, 30)


@pytest.fixture()
def instance_coco(tmp_path):
    Image.new("RGB", (30, 20), (90, 120, 150)).save(tmp_path / "a.png")
    known = rectangle(20, 30, 4, 6, 12, 21)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [6, 4, 15, 8], "area": 120, "iscrowd": 0, "segmentation": [[6, 4, 21, 4, 21, 12, 6, 12]]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [6, 4, 15, 8], "area": 120, "iscrowd": 0, "segmentation": uncompressed_rle(known)},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1,
         "segmentation": uncompressed_rle(rectangle(20, 30, 0, 0, 5, 5))},
    ]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}], "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path


def test_a_coco_file_gives_one_mask_per_box_without_crowds(instance_coco):
    dataset = CocoDetection(instance_coco, instance_coco / "ann.json", masks=True)
    _, target = dataset[0]
    assert target["masks"].shape == (2, 20, 30) and target["labels"].tolist() == [0, 1]
    assert torch.equal(target["masks"][1], torch.from_numpy(rectangle(20, 30, 4, 6, 12, 21)))
    assert "masks" not in CocoDetection(instance_coco, instance_coco / "ann.json")[0][1]


def test_an_object_without_segmentation_is_named(instance_coco):
    data = json.loads((instance_coco / "ann.json").read_text())
    del data["annotations"][0]["segmentation"]
    (instance_coco / "ann.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="annotation 1 in .* has no 'segmentation'"):
        CocoDetection(instance_coco, instance_coco / "ann.json", masks=True)


def _target(mask: np.ndarray, box: list[float]) -> dict:
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([0]), "masks": torch.from_numpy(mask[None])}


def mask_box(mask: torch.Tensor) -> list[int]:
    """xyxy pixel bounds of a mask (right and bottom exclusive)."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def test_a_mask_survives_flip_and_resize_exactly():
    image = Image.new("RGB", (60, 40))
    mask = rectangle(40, 60, 8, 10, 20, 30)  # rows 8..19, columns 10..29
    transform = DetectionTransform(train=True, scales=[80], max_size=1000, hflip=1.0)
    _, out = transform(image, _target(mask, [10, 8, 30, 20]))
    expected = rectangle(80, 120, 16, 60, 40, 100)  # flipped: columns 30..49, then doubled
    assert torch.equal(out["masks"][0], torch.from_numpy(expected))
    # and the box says the same: cxcywh normalised by 120 x 80
    cx, cy, w, h = (out["boxes"][0] * torch.tensor([120, 80, 120, 80])).tolist()
    assert [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] == pytest.approx(mask_box(out["masks"][0]))
    # evaluation halves it: no flip, shorter side 20
    _, out = DetectionTransform(train=False, scales=[20], max_size=1000)(image, _target(mask, [10, 8, 30, 20]))
    assert torch.equal(out["masks"][0], torch.from_numpy(rectangle(20, 30, 4, 5, 10, 15)))


@pytest.mark.parametrize("seed", range(6))
def test_a_cropped_mask_keeps_to_its_clipped_box(seed):
    """Random crops (the mask and box cut by the same window), then the resize back: the mask's bounds
    are the box's, and objects dropped with their box drop their mask."""
    image = Image.new("RGB", (64, 48))
    masks = np.stack((rectangle(48, 64, 8, 8, 40, 56), rectangle(48, 64, 0, 0, 6, 6)))
    target = {"boxes": torch.tensor([[8.0, 8, 56, 40], [0, 0, 6, 6]]), "labels": torch.tensor([0, 1]),
              "masks": torch.from_numpy(masks)}
    transform = DetectionTransform(train=True, scales=[48], max_size=1000, crop=[20, 40], crop_prob=1.0, hflip=0.5)
    torch.manual_seed(seed)
    _, out = transform(image, target)
    assert out["masks"].shape[0] == len(out["labels"]) == len(out["boxes"])
    assert tuple(out["masks"].shape[1:]) == tuple(out["size"].tolist())
    height, width = out["size"].tolist()
    for box, mask in zip(out["boxes"], out["masks"]):
        cx, cy, w, h = (box * torch.tensor([width, height, width, height])).tolist()
        # nearest-neighbour resizing moves an edge by at most one output pixel
        assert mask_box(mask) == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], abs=1.0)


def test_collate_pads_instance_masks_to_the_batch():
    first = (torch.zeros(3, 4, 6), {"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 6, dtype=torch.uint8)})
    second = (torch.zeros(3, 5, 3), {"labels": torch.tensor([0, 1]), "masks": torch.ones(2, 5, 3, dtype=torch.uint8)})
    _, padding, targets = collate_detection([first, second])
    assert [t["masks"].shape for t in targets] == [(1, 5, 6), (2, 5, 6)]
    assert torch.equal(targets[0]["masks"][0].bool(), ~padding[0]) and torch.equal(targets[1]["masks"][1].bool(),
                                                                                  ~padding[1])


def _segm_ground_truth():
    from dfx.data.coco import quiet_coco

    square = rectangle(20, 30, 0, 0, 10, 10)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0,
         "segmentation": uncompressed_rle(square)},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [6, 4, 15, 8], "area": 120, "iscrowd": 0,
         "segmentation": [[6, 4, 21, 4, 21, 12, 6, 12]]},
    ]
    images = [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 30} for i in (1, 2)]
    return quiet_coco({"images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}), square


def test_segm_results_of_the_ground_truth_score_ap_1_and_a_partial_mask_its_iou_share():
    from dfx.data.coco_eval import evaluate_coco, to_coco_segm_results

    coco_gt, square = _segm_ground_truth()
    masks = [decode_segmentations([coco_gt.anns[a]["segmentation"]], 20, 30) for a in (1, 2)]
    results = to_coco_segm_results([1, 2], masks, [[0.9], [0.8]], [[0], [1]], [1, 2])
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)  # JSON-ready
    json.dumps(results)
    stats = evaluate_coco(coco_gt, results, iou_type="segm")
    assert stats["AP"] == pytest.approx(1.0) and stats["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    # 71 of the square's 100 pixels: IoU 0.71 passes the thresholds 0.50..0.70 (5 of 10) only
    partial = np.zeros_like(square)
    partial[:7, :10] = 1
    partial[7, 0] = 1
    stats = evaluate_coco(coco_gt, to_coco_segm_results([1], [partial[None]], [[0.9]], [[0]], [1, 2]),
                          per_class=False, image_ids=[1], iou_type="segm")
    assert (stats["AP"], stats["AP50"], stats["AP75"]) == (pytest.approx(0.5), pytest.approx(1.0), 0.0)
    # a box over 81 of the square's 100 pixels: IoU 0.81, thresholds 0.50..0.80 (7 of 10)
    assert evaluate_coco(coco_gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 8.1], "score": 0.9}],
                         per_class=False, image_ids=[1])["AP"] == pytest.approx(0.7)


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def instance_task(folder: Path, *overrides: str):
    from dfx.recipe import load_recipe
    from dfx.tasks.detection import Task

    (folder / "images").mkdir()
    (folder / "a.png").rename(folder / "images" / "a.png")
    split = [f"data.{name}={{images: {folder / 'images'}, annotations: {folder / 'ann.json'}}}"
             for name in ("train", "val")]
    return Task(load_recipe(RECIPES / "dino-shapes.yaml", ["model.masks=true", *split, *overrides]))


def test_the_recipe_switch_reads_masks_and_adds_the_mask_terms(instance_coco):
    from dfx.recipe import load_recipe

    task = instance_task(instance_coco, "loss.mask_points=64", "loss.dice_weight=2")
    _, target = task.dataset("train")[0]
    assert target["masks"].shape[0] == 2 and tuple(target["masks"].shape[1:]) == tuple(target["size"].tolist())
    criterion = task.criterion()
    assert (criterion.weights["mask"], criterion.weights["dice"], criterion.masks.mask_points) == (5.0, 2.0, 64)
    assert criterion.matcher.masks is criterion.masks and criterion.matcher.masks.cost_mask == 5.0
    with pytest.raises(UsageError, match="loss.mask_points must be an integer >= 1"):
        load_recipe(RECIPES / "dino-shapes.yaml", ["model.masks=true", "loss.mask_points=0"])


def test_instance_masks_return_to_the_original_image_exactly():
    """Bands of stride-4 logits in a padded batch: 4x up, cut to the 48x64 image, 2x up to 96x128.
    (Bilinear rounds a block's corners; a band's edges land exactly.)"""
    from dfx.detection.masks import instance_masks

    logits = torch.full((1, 3, 16, 20), -5.0)
    logits[0, 1, 2:6, :] = 5.0  # stride-4 rows 2..5
    logits[0, 2, :, 4:8] = 5.0  # stride-4 columns 4..7
    masks, scores = instance_masks(logits, [torch.tensor([1, 2, 0])], torch.tensor([[48, 64]]),
                                   torch.tensor([[96, 128]]))
    rows, columns = torch.zeros(2, 96, 128, dtype=torch.bool)
    rows[16:48] = True
    columns[:, 32:64] = True
    assert masks[0].shape == (3, 96, 128) and not masks[0][2].any()
    assert torch.equal(masks[0][0], rows) and torch.equal(masks[0][1], columns)
    assert 0.5 < scores[0][0] < 1 and scores[0][2] == 0


def test_the_evaluator_scores_segm_next_to_bbox(instance_coco):
    """Predictions that are the ground truth (stride-4 masks at 4x the image: the same pixels) score
    box and mask AP 1."""
    task = instance_task(instance_coco, "data.scales=[80]", "data.max_size=200")
    evaluator = task.evaluator()
    batch = collate_detection([evaluator.dataset[0]])
    target = batch[2][0]
    assert tuple(batch[0].shape[-2:]) == (80, 120)
    gt = decode_segmentations(task.dataset("val").segments[1], 20, 30)
    outputs = {"pred_logits": torch.where(torch.nn.functional.one_hot(target["labels"], 2).bool(), 5.0, -5.0)[None],
               "pred_boxes": target["boxes"][None], "pred_masks": torch.from_numpy(gt)[None].float() * 20 - 10}
    evaluator.update(lambda images, masks: outputs, batch)
    metrics = evaluator.summarize([evaluator.state()])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)
    assert metrics["segm/AP/a"] == pytest.approx(1.0) and metrics["segm/AP/b"] == pytest.approx(1.0)
    # masks shifted off their objects: the boxes still score 1, the masks no longer do
    outputs["pred_masks"] = torch.roll(outputs["pred_masks"], 6, dims=-1)
    evaluator = task.evaluator()
    evaluator.update(lambda images, masks: outputs, batch)
    metrics = evaluator.summarize([evaluator.state()])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["segm/AP"] < 0.5


@pytest.mark.slow
def test_dfx_train_with_masks_reports_segm_next_to_bbox(tmp_path):
    """One tiny epoch of the one detector with MaskDINO's switches on shapes-det, its boxes given as
    polygons: training reads the masks, the losses take them, evaluation scores segm/AP."""
    from dfx.data.shapes_det import generate_shapes_det
    from dfx.engine import train

    root = tmp_path / "shapes"
    generate_shapes_det(root, seed=0, train_images=4, val_images=3)
    for file in (root / "annotations").glob("*.json"):
        data = json.loads(file.read_text())
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        file.write_text(json.dumps(data))
    tiny = ["model.backbone=resnet10t", "model.dim=32", "model.heads=4", "model.encoder_layers=1",
            "model.decoder_layers=2", "model.ffn_dim=64", "model.one2one_queries=10", "data.scales=[64]",
            "data.max_size=64", "data.crop=null", "train.epochs=1", "train.batch_size=2", "train.num_workers=0",
            "train.warmup_steps=0", "eval.batch_size=4", "eval.draw_images=0", "model.masks=true",
            "model.initialize_box_type=mask2box", "loss.mask_points=256"]
    result = train(RECIPES / "dino-shapes.yaml", [f"data.root={root}", *tiny], out=tmp_path / "run", device="cpu",
                   quiet=True)
    metrics = result["metrics"]
    segm = {k: v for k, v in metrics.items() if k.startswith("segm/")}
    assert {"segm/AP", "segm/AP50", "segm/AR100"} <= set(segm) and "AP" in metrics
    assert any(k.startswith("segm/AP/") for k in segm) and all(0 <= v <= 1 for v in segm.values())


def test_yolo_seg_polygons_become_masks(tmp_path):
    """A YOLO-seg polygon line keeps its polygon (in pixels) as the object's mask; a box line has none."""
    from dfx.data.formats import find_detection_data

    root = tmp_path / "y"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        Image.new("RGB", (40, 20)).save(root / split / "images" / "a.png")
        (root / split / "labels" / "a.txt").write_text("0 0.25 0.25 0.75 0.25 0.75 0.75 0.25 0.75\n1 0.5 0.5 0.2 0.2")
    (root / "data.yaml").write_text("train: train/images\nval: val/images\nnames: [cat, dog]\n")
    split = find_detection_data(root).split("train")
    square, box = split.annotations["annotations"]
    assert square["segmentation"] == [[10.0, 5.0, 30.0, 5.0, 30.0, 15.0, 10.0, 15.0]] and "segmentation" not in box
    dataset = CocoDetection(split.images, split.ann_file, annotations={**split.annotations,
                                                                       "annotations": [square]}, masks=True)
    _, target = dataset[0]
    mask = target["masks"][0].numpy().astype(bool)
    assert mask.shape == (20, 40) and mask[6:14, 11:29].all() and not mask[:4].any() and not mask[:, :9].any()
