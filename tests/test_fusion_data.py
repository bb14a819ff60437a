"""Multi-modal segmentation data: the layout, NYUDv2 split lines, aligned augmentation, bad input, shapes-rgbd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dfx.data.cache import tree_checksum
from dfx.data.multimodal import MultiModalFolder, MultiModalTransform
from dfx.data.shapes_rgbd import generate_shapes_rgbd
from dfx.errors import UsageError


def write_root(root, labels: dict, modalities=("rgb", "depth"), sizes: dict | None = None, label_folder="labels",
               classes=("background", "a", "b")):
    """A multi-modal root: random RGB for 'rgb', 8-bit grey for the others, the given label maps."""
    rng = np.random.default_rng(0)
    for folder in (*modalities, label_folder):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "train.txt").write_text("\n".join(labels) + "\n")
    for sample_id, label in labels.items():
        for modality in modalities:
            height, width = (sizes or {}).get((sample_id, modality), label.shape)
            shape = (height, width, 3) if modality == "rgb" else (height, width)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / modality / f"{sample_id}.png")
        Image.fromarray(label).save(root / label_folder / f"{sample_id}.png")
    return root


def test_reads_every_modality_as_three_channels(tmp_path):
    label = np.array([[0, 1, 2], [255, 1, 0]], dtype=np.uint8)
    root = write_root(tmp_path / "d", {"x": label})
    dataset = MultiModalFolder(root, "train", ["rgb", "depth"])
    images, loaded = dataset.load(0)
    assert [im.shape for im in images] == [(2, 3, 3), (2, 3, 3)]
    depth = np.asarray(Image.open(root / "depth" / "x.png"))
    assert all(np.array_equal(images[1][..., c], depth) for c in range(3))  # grey repeated
    np.testing.assert_array_equal(loaded, label)


def test_nyudv2_style_split_lines_of_paths(tmp_path):
    """The official NYUDv2 lists: one line per sample, tab-separated paths, labels in masks/."""
    label = np.zeros((4, 4), dtype=np.uint8)
    root = write_root(tmp_path / "nyu", {"000002": label, "000003": label + 1}, label_folder="masks")
    (root / "train.txt").write_text("rgb/000002.png\tdepth/000002.png\tmasks/000002.png\n"
                                    "masks/000003.png\trgb/000003.png\tdepth/000003.png\n")
    dataset = MultiModalFolder(root, "train", ["rgb", "depth"], labels="masks")
    assert dataset.samples[1] == ([root / "rgb/000003.png", root / "depth/000003.png"], root / "masks/000003.png")
    assert dataset.load(1)[1].max() == 1
    (root / "val.txt").write_text("rgb/000002.png\tmasks/000002.png\n")
    with pytest.raises(UsageError, match=r"split line .* names no file in depth/"):
        MultiModalFolder(root, "val", ["rgb", "depth"], labels="masks")


def test_augmentation_is_identical_for_every_modality_and_the_label():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = (rgb[..., 0] // 128).astype(np.uint8)  # a function of the image: must stay so after any crop/flip
    transform = MultiModalTransform((24, 32), training=True, scale=(0.3, 1.0), hflip=0.5, mean=(0, 0, 0),
                                    std=(1, 1, 1))
    for seed in range(6):
        torch.manual_seed(seed)
        images, out_label = transform([rgb, rgb.copy()], label)
        assert images.shape == (2, 3, 24, 32) and out_label.shape == (24, 32) and out_label.dtype == torch.int64
        assert torch.equal(images[0], images[1])
        assert set(out_label.unique().tolist()) <= {0, 1}
    evaluation = MultiModalTransform((20, 30), training=False, normalize="all")
    images, out_label = evaluation([rgb, rgb], label)
    torch.testing.assert_close(images[0], images[1])
    assert images.shape == (2, 3, 20, 30) and images.min() >= -1 and images.max() <= 1  # (x - 0.5) / 0.5


def test_only_the_first_modality_is_normalised_by_mean_and_std():
    """The reference normalises RGB with ImageNet mean/std and only divides depth/event/LiDAR by 255."""
    rgb = np.full((4, 4, 3), 255, dtype=np.uint8)
    depth = np.full((4, 4, 3), 51, dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = MultiModalTransform((4, 4), training=False, mean=mean, std=std)
    images, _ = transform([rgb, depth, depth], np.zeros((4, 4), dtype=np.uint8))
    torch.testing.assert_close(images[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))
    torch.testing.assert_close(images[1:], torch.full((2, 3, 4, 4), 0.2))


def test_bad_input_errors_name_the_file(tmp_path):
    good = np.zeros((4, 6), dtype=np.uint8)
    root = write_root(tmp_path / "sizes", {"a": good}, sizes={("a", "depth"): (4, 5)})
    with pytest.raises(UsageError, match=r"sizes/depth/a\.png is 5x4 but .*sizes/rgb/a\.png is 6x4 .*aligned"):
        MultiModalFolder(root, "train", ["rgb", "depth"]).load(0)

    root = write_root(tmp_path / "missing", {"a": good, "b": good})
    (root / "depth" / "b.png").unlink()
    with pytest.raises(UsageError, match=r"depth image .*missing/depth/b\.png of id 'b' is missing"):
        MultiModalFolder(root, "train", ["rgb", "depth"])

    root = write_root(tmp_path / "range", {"a": np.array([[0, 7], [255, 1]], dtype=np.uint8)})
    with pytest.raises(UsageError, match=r"label .*range/labels/a\.png holds values \[7\]: class ids must be in "
                                         r"\[0, 3\)"):
        MultiModalFolder(root, "train", ["rgb", "depth"]).load(0)

    root = write_root(tmp_path / "absent", {"a": good})
    with pytest.raises(UsageError, match=r"data.modalities: 'lidar' is listed but .*absent/lidar/ does not exist "
                                         r"\(folders in .*: depth, labels, rgb\)"):
        MultiModalFolder(root, "train", ["rgb", "depth", "lidar"])

    with pytest.raises(UsageError, match=r"data.root: .*nowhere does not exist; expected <root>/<modality>/<id>\.png"):
        MultiModalFolder(tmp_path / "nowhere", "train", ["rgb", "depth"])


def test_shapes_rgbd_is_deterministic_and_needs_both_modalities(tmp_path):
    meta = generate_shapes_rgbd(tmp_path / "a", train_images=24, val_images=4)
    generate_shapes_rgbd(tmp_path / "b", train_images=24, val_images=4)
    assert tree_checksum(tmp_path / "a") == tree_checksum(tmp_path / "b")
    assert meta["classes"] == ["background", "red", "lime", "cyan", "violet"]
    dataset = MultiModalFolder(tmp_path / "a", "train", ["rgb", "depth", "event", "lidar"])
    assert len(dataset) == 24
    raised, camouflaged, decoy = [], 0, 0
    for index in range(len(dataset)):
        (rgb, depth, _, lidar), label = dataset.load(index)
        objects = label > 0
        raised.append(depth[..., 0][objects].mean() - depth[..., 0][~objects].mean())
        assert (lidar == 0).mean() > 0.6  # LiDAR returns on sparse scan lines only
        # an object pixel whose colour is far from every saturated class colour: the background shows through
        spread = rgb.max(-1).astype(int) - rgb.min(-1).astype(int)
        camouflaged += int((objects & (spread < 60)).sum() > 20)
        decoy += int((~objects & (spread > 150)).sum() > 20)
    assert min(raised) > 40  # objects stand out in depth in every image
    assert camouflaged >= 3 and decoy >= 3  # RGB alone misses object pixels and sees decoys
