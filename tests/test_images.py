"""Images as they come: EXIF orientation, greyscale / CMYK / palette / alpha / 16-bit, truncated files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dfx.data.coco import CocoDetection
from dfx.data.images import image_problem, image_size, load_rgb
from dfx.errors import UsageError


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # stored landscape 40x20, left half red
    pixels[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown as a 20x40 portrait, the red half on top
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100)
    image = load_rgb(tmp_path / "phone.jpg")
    assert image.size == (20, 40) and image_size(tmp_path / "phone.jpg") == (20, 40)
    shown = np.asarray(image)
    assert shown[5, 10, 0] > 200 and shown[35, 10, 0] < 50


@pytest.mark.parametrize("mode, value, expected", [
    ("I;16", 65535, (255, 255, 255)), ("I;16", 32896, (128, 128, 128)), ("I", 65535, (255, 255, 255)),
    ("L", 77, (77, 77, 77)), ("CMYK", (0, 255, 255, 0), (255, 0, 0)), ("LA", (200, 0), (0, 0, 0)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)), ("RGBA", (10, 20, 30, 0), (0, 0, 0)),
])
def test_every_mode_becomes_8_bit_rgb(tmp_path, mode, value, expected):
    image = Image.new(mode, (4, 3), value)
    suffix = ".tif" if mode in ("CMYK", "I") else ".png"
    image.save(tmp_path / f"x{suffix}")
    loaded = load_rgb(tmp_path / f"x{suffix}")
    assert loaded.mode == "RGB" and loaded.size == (4, 3)
    assert tuple(np.asarray(loaded)[1, 2]) == expected


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.save(tmp_path / "p.png", transparency=0)  # index 0 transparent
    pixels = np.asarray(load_rgb(tmp_path / "p.png"))
    assert tuple(pixels[0, 0]) == (0, 0, 0) and tuple(pixels[2, 2]) == (250, 10, 10)


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_file_is_a_clear_error(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("cut.jpg", "cut.png"):
        Image.fromarray(noise).save(tmp_path / name)
        truncate(tmp_path / name)
        with pytest.raises(UsageError, match=rf"cannot read image .*{name}: truncated file; remove or replace"):
            load_rgb(tmp_path / name)
        assert image_problem(tmp_path / name) == "truncated file"
        assert image_problem(tmp_path / name, decode=False) == "truncated file"  # without decoding
    (tmp_path / "notes.jpg").write_text("not an image")
    assert image_problem(tmp_path / "notes.jpg").startswith("unreadable")
    assert image_problem(tmp_path / "absent.jpg") == "missing"


def test_skip_invalid_drops_and_counts_unreadable_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(noise).save(folder / f"{i}.jpg")
    truncate(folder / "1.jpg")
    (folder / "2.jpg").write_text("html error page")
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 32, "height": 32} for i in range(4)]
    annotations = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8]} for i in range(4)]
    ann_file = tmp_path / "a.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": 1, "name": "x"}]}))
    dataset = CocoDetection(folder, ann_file, skip_invalid=True)
    assert dataset.ids == [0, 3] and dataset.skipped == {"unreadable image": 2}
    assert "skipped 2 (unreadable image)" in dataset.skip_summary()
    strict = CocoDetection(folder, ann_file)
    assert len(strict) == 4
    with pytest.raises(UsageError, match=r"1.jpg: truncated file"):
        strict[1]
