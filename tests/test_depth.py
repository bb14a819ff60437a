"""Depth as sensors and datasets ship it: real NYU / SUN RGB-D / TUM pairs through the data pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pathlib import Path
from PIL import Image

from dfx.data.depth import DepthFormat, raw_to_metres, read_depth_metres, read_image_array
from dfx.data.multimodal import MultiModalFolder, MultiModalTransform
from dfx.errors import UsageError
from shared_data import DATA, needs

SAMPLES = DATA / "rgbd-samples"
needs_samples = needs("rgbd-samples")

# (colour file, depth file, data.depth_* overrides, documented range in metres of the valid pixels)
REAL_PAIRS = {
    "nyu": ("NYU_color.ppm", "NYU_depth.pgm", DepthFormat("nyu-raw"), (1.3, 7.0)),
    "sun": ("SUN_color.jpg", "SUN_depth.png", DepthFormat("sunrgbd"), (1.0, 10.0)),
    "tum": ("TUM_color.png", "TUM_depth.png", DepthFormat("linear", scale=5000), (1.4, 9.5)),
}


def linked_root(tmp_path: Path, colour: str, depth: str) -> Path:
    """A dataset root whose rgb/ and depth/ link to the shared files (read in place, never copied)."""
    root = tmp_path / "root"
    for folder in ("rgb", "depth", "labels"):
        (root / folder).mkdir(parents=True)
    (root / "rgb" / f"a{Path(colour).suffix}").symlink_to(SAMPLES / colour)
    (root / "depth" / f"a{Path(depth).suffix}").symlink_to(SAMPLES / depth)
    Image.fromarray(np.zeros((480, 640), dtype=np.uint8)).save(root / "labels" / "a.png")
    (root / "val.txt").write_text(f"rgb/a{Path(colour).suffix}\tdepth/a{Path(depth).suffix}\tlabels/a.png\n")
    return root


@needs_samples
@pytest.mark.parametrize("name", REAL_PAIRS)
def test_real_rgbd_pairs_load_with_their_documented_depth_units(tmp_path, name):
    colour, depth_file, depth, (low, high) = REAL_PAIRS[name]
    root = linked_root(tmp_path, colour, depth_file)
    dataset = MultiModalFolder(root, "val", ["rgb", "depth"], classes=["background"], depth=depth,
                               transform=MultiModalTransform((480, 640), training=False))
    (rgb, depth_image), _ = dataset.load(0)
    assert rgb.shape == depth_image.shape == (480, 640, 3)
    metres = depth_image[..., 0] * depth.max_metres / 255
    valid = metres > 0
    assert 0.05 < 1 - valid.mean() < 0.25  # every sample has holes (no return), read as 0 m
    assert low <= metres[valid].min() and metres[valid].max() <= high
    assert 2.0 < np.median(metres[valid]) < 4.0  # indoor scenes: a median of a few metres
    images, _ = dataset[0]
    assert images.shape == (2, 3, 480, 640) and 0 <= images[1].min() and images[1].max() <= 1  # depth / 255 only


@needs_samples
def test_raw_depth_units_match_the_datasets_toolboxes():
    nyu = read_depth_metres(SAMPLES / "NYU_depth.pgm", DepthFormat("nyu-raw"))
    # NYU's toolbox: swap the PGM's bytes, 2047 = no return, metres = 351.3 / (1092.5 - d)
    with open(SAMPLES / "NYU_depth.pgm", "rb") as f:
        raw = np.frombuffer(f.read()[-480 * 640 * 2:], dtype="<u2").reshape(480, 640)
    assert raw[0, 0] == 2047 and nyu[0, 0] == 0
    d = float(raw[240, 320])
    assert nyu[240, 320] == pytest.approx(351.3 / (1092.5 - d), rel=1e-6)
    sun = read_depth_metres(SAMPLES / "SUN_depth.png", DepthFormat("sunrgbd"))
    stored = int(np.asarray(Image.open(SAMPLES / "SUN_depth.png"))[240, 320])
    assert sun[240, 320] == pytest.approx((((stored >> 3) | (stored << 13)) & 0xFFFF) / 1000)
    # read as plain millimetres, the same file would put walls 20-60 m away
    assert np.percentile(read_depth_metres(SAMPLES / "SUN_depth.png"), 99) > 20
    tum = read_depth_metres(SAMPLES / "TUM_depth.png", DepthFormat("linear", scale=5000))
    assert tum[240, 320] == pytest.approx(int(np.asarray(Image.open(SAMPLES / "TUM_depth.png"))[240, 320]) / 5000)


def test_sixteen_bit_millimetres_map_to_the_eight_bit_scale(tmp_path):
    Image.fromarray(np.array([[0, 1000], [5000, 20000]], dtype=np.uint16)).save(tmp_path / "d.png")
    array = read_image_array(tmp_path / "d.png", DepthFormat("linear", scale=1000, max_metres=10))
    np.testing.assert_allclose(array[..., 0], [[0, 25.5], [127.5, 255]])  # 0 (invalid) stays 0; clipped at 10 m
    assert np.array_equal(array[..., 0], array[..., 2])
    Image.fromarray(np.array([[0, 63], [127, 255]], dtype=np.uint8)).save(tmp_path / "e.png")
    np.testing.assert_array_equal(read_image_array(tmp_path / "e.png")[..., 1], [[0, 63], [127, 255]])  # as is
    hha = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 20
    Image.fromarray(hha).save(tmp_path / "hha.png")
    np.testing.assert_array_equal(read_image_array(tmp_path / "hha.png"), hha)  # HHA stays three channels


def test_nyu_no_return_and_out_of_range_values_read_as_zero_or_ten_metres():
    raw = np.array([[2047, 1091]], dtype=np.uint16).byteswap()  # as PIL reads the PGM
    metres = raw_to_metres(raw, DepthFormat("nyu-raw"))
    assert metres[0, 0] == 0 and metres[0, 1] == pytest.approx(10.0)


def test_a_depth_file_of_an_unexpected_mode_names_the_file_and_the_modes(tmp_path):
    Image.new("LAB", (4, 4)).save(tmp_path / "d.tif")
    with pytest.raises(UsageError, match=r"d\.tif: image mode 'LAB' is not understood; .*I;16"):
        read_image_array(tmp_path / "d.tif")
    Image.new("L", (4, 4)).save(tmp_path / "eight.png")
    with pytest.raises(UsageError, match=r"eight\.png: image mode 'L' holds no raw depth"):
        read_depth_metres(tmp_path / "eight.png")
    with pytest.raises(UsageError, match=r"data.depth_encoding: 'kinect' is not one of linear, sunrgbd, nyu-raw"):
        DepthFormat("kinect")


def test_recipe_depth_keys_reach_the_data_pipeline(tmp_path):
    from dfx.recipe import load_recipe
    from dfx.tasks.fusion import Task

    root = tmp_path / "d"
    for folder in ("rgb", "depth", "labels"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / "rgb" / "a.png")
    Image.fromarray(np.full((4, 4), 2500, dtype=np.uint16)).save(root / "depth" / "a.png")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(root / "labels" / "a.png")
    (root / "val.txt").write_text("a\n")
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "gemini-shapes.yaml",
                         [f"data.root={root}", "data.classes=[background]", "data.depth_scale=5000",
                          "data.depth_max=2.0", "data.image_size=4"])
    images, _ = Task(recipe).dataset("val")[0]
    torch.testing.assert_close(images[1], torch.full((3, 4, 4), 0.25))  # 2500 / 5000 = 0.5 m of 2 m
