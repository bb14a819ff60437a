"""Segmentation: the data format and its errors, aligned augmentation, shapes-seg, the mIoU evaluator, the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dfx.data.cache import tree_checksum
from dfx.data.embedded import generate_shapes_seg
from dfx.data.segmentation import IGNORE_INDEX, SegmentationFolder, SegmentationTransform
from dfx.errors import UsageError
from dfx.recipe import build_recipe
from dfx.tasks.segmentation import Evaluator, Task


def write_root(root, labels: dict, classes=("background", "a", "b"), image_sizes: dict | None = None, split="train"):
    """A segmentation root holding one uint8 label map per id (images are random of the same size)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / f"{split}.txt").write_text("\n".join(labels) + "\n")
    rng = np.random.default_rng(0)
    for sample_id, label in labels.items():
        height, width = (image_sizes or {}).get(sample_id, label.shape)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{sample_id}.png")
        Image.fromarray(label).save(root / "labels" / f"{sample_id}.png")
    return root


# ------------------------------------------------------------------------------------------ data format


def test_folder_reads_pairs_and_classes(tmp_path):
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    root = write_root(tmp_path / "d", {"x": label, "y": label[::-1].copy()})
    dataset = SegmentationFolder(root, "train")
    assert dataset.classes == ["background", "a", "b"] and len(dataset) == 2
    image, loaded = dataset[1]
    assert image.size == (2, 2) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, label[::-1])


def test_errors_name_the_file(tmp_path):
    good = np.zeros((4, 6), dtype=np.uint8)
    root = write_root(tmp_path / "missing-image", {"a": good, "b": good})
    (root / "images" / "b.png").unlink()
    with pytest.raises(UsageError, match=r"image .*missing-image/images/b\.png of id 'b' is missing"):
        SegmentationFolder(root, "train")

    root = write_root(tmp_path / "missing-label", {"a": good})
    (root / "labels" / "a.png").unlink()
    with pytest.raises(UsageError, match=r"label .*missing-label/labels/a\.png of id 'a' is missing"):
        SegmentationFolder(root, "train")

    root = write_root(tmp_path / "size", {"a": good}, image_sizes={"a": (4, 5)})
    with pytest.raises(UsageError, match=r"label .*size/labels/a\.png is 6x4 but its image .*a\.png is 5x4"):
        SegmentationFolder(root, "train")[0]

    bad = good.copy()
    bad[0, :3] = [3, 7, 255]  # 3 classes: 3 and 7 are out of range, 255 is fine
    root = write_root(tmp_path / "values", {"a": bad})
    with pytest.raises(UsageError, match=r"values/labels/a\.png holds values \[3, 7\]: class ids must be in \[0, 3\)"):
        SegmentationFolder(root, "train")[0]

    with pytest.raises(UsageError, match=r"val\.txt does not exist"):
        SegmentationFolder(root, "val")
    (root / "classes.txt").unlink()
    with pytest.raises(UsageError, match=r"classes\.txt does not exist"):
        SegmentationFolder(root, "train")


def test_augmentation_moves_image_and_label_together():
    """Image channels encode each pixel's source (x, y); the label is a function of x. After a random
    resized crop and flip, the label must still be that function of the (bilinear) image."""
    size = 64
    xs = np.arange(size)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = xs[None, :] * 4
    image[..., 1] = xs[:, None] * 4
    label = np.broadcast_to((xs // 8)[None, :], (size, size)).astype(np.uint8).copy()  # 8 column bands
    label[:, :4] = IGNORE_INDEX
    transform = SegmentationTransform(48, training=True, scale=(0.3, 1.0), hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out_label = transform(Image.fromarray(image), label)
        assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48) and out_label.dtype == torch.int64
        assert set(out_label.unique().tolist()) <= set(range(8)) | {IGNORE_INDEX}  # nearest: no new values
        source_x = out_image[0] * 255 / 4  # bilinear keeps the ramp linear: the source column of each pixel
        expected = torch.where(source_x < 4, IGNORE_INDEX, (source_x // 8).long())
        away_from_edges = ((source_x % 8) - 4).abs() < 3  # rounding can flip a band edge pixel
        agree = (out_label == expected)[away_from_edges].float().mean()
        assert agree > 0.99, (seed, agree)
        flipped += bool(source_x[:, 0].mean() > source_x[:, -1].mean())
    assert 0 < flipped < 12  # some crops were flipped, some not


def test_eval_transform_resizes_label_with_nearest():
    label = np.zeros((32, 32), dtype=np.uint8)
    label[:, 16:] = 2
    label[:8] = IGNORE_INDEX
    image, out = SegmentationTransform(16, training=False)(Image.new("RGB", (32, 32)), label)
    assert image.shape == (3, 16, 16)
    assert out[:4].eq(IGNORE_INDEX).all() and out[4:, :8].eq(0).all() and out[4:, 8:].eq(2).all()


def test_shapes_seg_is_deterministic(tmp_path):
    meta = generate_shapes_seg(tmp_path / "a", train_images=5, val_images=3)
    generate_shapes_seg(tmp_path / "b", train_images=5, val_images=3)
    assert tree_checksum(tmp_path / "a") == tree_checksum(tmp_path / "b")
    assert meta["classes"] == ["background", "circle", "square", "triangle", "star", "cross"]
    train, val = SegmentationFolder(tmp_path / "a", "train"), SegmentationFolder(tmp_path / "a", "val")
    assert (len(train), len(val)) == (5, 3)
    labels = np.stack([train.load(i)[1] for i in range(5)])
    assert labels.shape == (5, 64, 64) and labels.max() <= 5
    assert (labels == 0).mean() > 0.5 and (labels > 0).any()  # background and shapes


# -------------------------------------------------------------------------------------------- evaluator


def test_evaluator_against_a_hand_count():
    # 4 classes. Class 3 appears nowhere (no IoU, not in the mean); class 2 only in predictions (IoU 0).
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255], [255, 255, 0, 0]])
    preds = torch.tensor([[0, 1, 1, 1], [0, 1, 2, 3], [1, 2, 0, 2]])
    evaluator = Evaluator(["bg", "a", "b", "c"])
    evaluator.add(preds[None], labels[None])
    # valid pixels (9): label 0 -> preds 0,1,0,0,2 ; label 1 -> preds 1,1,1,2
    # class 0: TP 3, FP 0, FN 2 -> 3/5 ; class 1: TP 3, FP 1, FN 1 -> 3/5 ; class 2: TP 0, FP 2 -> 0
    metrics = Evaluator.summarize([evaluator.state()])
    assert metrics["iou/bg"] == pytest.approx(3 / 5)
    assert metrics["iou/a"] == pytest.approx(3 / 5)
    assert metrics["iou/b"] == 0.0 and "iou/c" not in metrics
    assert metrics["mIoU"] == pytest.approx((3 / 5 + 3 / 5 + 0) / 3)
    assert metrics["pixel_acc"] == pytest.approx(6 / 9)

    # split over two "ranks": the same result
    first, second = Evaluator(["bg", "a", "b", "c"]), Evaluator(["bg", "a", "b", "c"])
    first.add(preds[None, :1], labels[None, :1])
    second.add(preds[None, 1:], labels[None, 1:])
    assert Evaluator.summarize([first.state(), second.state()]) == metrics


def test_evaluator_update_runs_the_model_and_ignores_255():
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = logits.argmax(1)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 0, 0] = (labels[1, 0, 0] + 1) % 3  # one wrong pixel
    evaluator = Evaluator(["x", "y", "z"])
    evaluator.update(lambda images: logits, (torch.zeros(2, 3, 8, 8), labels))
    metrics = Evaluator.summarize([evaluator.state()])
    valid = labels != IGNORE_INDEX
    assert metrics["pixel_acc"] == pytest.approx(1 - 1 / int(valid.sum()))
    expected_loss = F.cross_entropy(logits.double(), labels, ignore_index=IGNORE_INDEX)
    assert metrics["loss"] == pytest.approx(float(expected_loss), rel=1e-5)


# ------------------------------------------------------------------------------------------ task, model


def tiny_recipe(root):
    return build_recipe({
        "task": "segmentation",
        "model": {"name": "vit_tiny_patch16_224",
                  "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
        "data": {"root": str(root), "image_size": 32},
    })


def test_task_builds_a_segmenter_and_its_loss_ignores_255(tmp_path):
    labels = {f"s{i}": np.full((40, 40), i % 3, dtype=np.uint8) for i in range(4)}
    root = write_root(tmp_path / "d", labels)
    (root / "val.txt").write_text("s0\ns1\n")
    recipe = tiny_recipe(root)
    assert recipe.eval.metric == "mIoU"
    task = Task(recipe)
    torch.manual_seed(0)
    model = task.build_model().eval()
    assert task.classes == ["background", "a", "b"]
    images, label = task.dataset("train")[1]
    assert images.shape == (3, 32, 32) and label.shape == (32, 32)
    batch = torch.randn(2, 3, 32, 32)
    logits = model(batch)
    assert logits.shape == (2, 3, 32, 32)
    # the decoder is linear on the final patch tokens, upsampled bilinearly from the 4x4 grid
    tokens = model.backbone.forward_features(batch)[:, 1:]  # [2, 16, C]
    grid_logits = model.head(tokens).transpose(1, 2).reshape(2, 3, 4, 4)
    torch.testing.assert_close(logits, F.interpolate(grid_logits, size=(32, 32), mode="bilinear"))
    target = torch.randint(0, 3, (2, 32, 32))
    target[:, :5] = IGNORE_INDEX
    loss, _ = task.loss(model, (batch, target))
    keep = target != IGNORE_INDEX
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    torch.testing.assert_close(loss, manual)


def test_segmentation_needs_a_vit(tmp_path):
    root = write_root(tmp_path / "d", {"s": np.zeros((8, 8), dtype=np.uint8)}, split="val")
    recipe = tiny_recipe(root)
    recipe.model.name, recipe.model.kwargs = "resnet10t", {}
    with pytest.raises(UsageError, match="'resnet10t' is not a plain ViT"):
        Task(recipe).build_model()
