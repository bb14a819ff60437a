"""Embedded datasets: generated deterministically on first use, cached, verified by checksum.

``data.root`` may name one of these instead of a folder.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfx.data.cache import ensure_dataset
from dfx.data.shapes import CLS_SHAPES, contrasting_colour, draw_shape, place_apart, shape_polygon, textured_background
from dfx.data.shapes_det import SHAPES_DET_VERSION, generate_shapes_det
from dfx.data.shapes_inst import SHAPES_INST_VERSION, generate_shapes_inst
from dfx.data.shapes_pose import SHAPES_POSE_VERSION, generate_shapes_pose
from dfx.data.shapes_rgbd import SHAPES_DEPTH_VERSION, SHAPES_RGBD_VERSION, generate_shapes_depth, generate_shapes_rgbd
from dfx.data.shapes_translation import SHAPES_TRANSLATION_VERSION, generate_shapes_translation

SHAPES_CLS_VERSION = 2
SHAPES_SEG_VERSION = 1


def generate_shapes_cls(folder: Path, seed: int = 0, train_per_class: int = 600, val_per_class: int = 150,
                        size: int = 32) -> dict:
    """Write an ImageFolder tree ``folder/{train,val}/<shape>/<index>.png`` of one-shape images.

    Each image: a textured background and one shape of random colour, size (30-45% of the
    image side as circumradius), position (centre +-12% of the side) and
    rotation (+-22.5 degrees). Drawn at 2x and downsampled so edges
    are anti-aliased. Train and val use disjoint random streams.
    """
    scale = 2
    for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        rng = np.random.default_rng([SHAPES_CLS_VERSION, split_seed])
        for label, kind in enumerate(CLS_SHAPES):
            out = folder / split / kind
            out.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                big = size * scale
                background = textured_background(rng, big, big, brightness=(20, 140))
                image = Image.fromarray(background)
                radius = rng.uniform(0.3, 0.45) * big
                # positions vary around the centre (up to 12% of the side): enough to need some
                # translation invariance, little enough that a small ViT learns it in minutes
                cx, cy = big / 2 + rng.uniform(-0.12, 0.12, size=2) * big
                angle = rng.uniform(-np.pi / 8, np.pi / 8)  # tilted up to 22.5 degrees either way
                draw_shape(image, kind, cx, cy, radius, angle, contrasting_colour(rng, background, brighter_by=60))
                image.resize((size, size), Image.LANCZOS).save(out / f"{index:05d}.png", optimize=False)
    return {"classes": list(CLS_SHAPES), "train_per_class": train_per_class, "val_per_class": val_per_class,
            "size": size, "seed": seed}


def generate_shapes_seg(folder: Path, seed: int = 0, train_images: int = 2000, val_images: int = 500,
                        size: int = 64, radius: tuple[float, float] = (0.2, 0.32), max_shapes: int = 3) -> dict:
    """Write a segmentation root (dfx.data.segmentation layout) of multi-shape scenes.

    Each image: a textured background (class 0) and 1 to ``max_shapes`` shapes of the five shape
    classes (ids 1-5, in CLS_SHAPES order), placed without overlapping, with random circumradius
    (``radius``: share of the image side), position and rotation. Each class has its own hue
    family (class_colour), so a small ViT trained from scratch on a CPU learns the classes in
    minutes; what it must still get right is where each shape ends. Image and label are drawn at
    2x; the image is downsampled with Lanczos (anti-aliased edges), the label with nearest
    neighbours (ids stay ids). Ids are ``train-00000``, ``val-00000``, ...; train and val use
    disjoint random streams.
    """
    big = size * 2  # drawn at 2x, then downsampled
    classes = ["background", *CLS_SHAPES]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    for split, count, split_seed in (("train", train_images, seed), ("val", val_images, seed + 1)):
        rng = np.random.default_rng([SHAPES_SEG_VERSION, split_seed, 7])  # 7: not shapes-cls's stream
        ids = [f"{split}-{index:05d}" for index in range(count)]
        for sample_id in ids:
            background = textured_background(rng, big, big, brightness=(20, 140))
            image, label = Image.fromarray(background), Image.new("L", (big, big), 0)
            placed: list[tuple[float, float, float]] = []
            for _ in range(int(rng.integers(1, max_shapes + 1))):
                kind = int(rng.integers(len(CLS_SHAPES)))
                shape_radius = rng.uniform(*radius) * big
                centre = place_apart(rng, shape_radius, big, placed)  # shapes never overlap: labels are whole shapes
                if centre is None:
                    continue
                cx, cy = centre
                placed.append((cx, cy, shape_radius))
                angle = rng.uniform(0, 2 * np.pi)
                draw_shape(image, CLS_SHAPES[kind], cx, cy, shape_radius, angle, class_colour(rng, kind))
                polygon = shape_polygon(CLS_SHAPES[kind], cx, cy, shape_radius, angle)
                ImageDraw.Draw(label).polygon(polygon, fill=kind + 1)
            image.resize((size, size), Image.LANCZOS).save(folder / "images" / f"{sample_id}.png", optimize=False)
            label.resize((size, size), Image.NEAREST).save(folder / "labels" / f"{sample_id}.png", optimize=False)
        (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"classes": classes, "train_images": train_images, "val_images": val_images, "size": size, "seed": seed}


def class_colour(rng: np.random.Generator, kind: int) -> tuple:
    """A bright RGB colour in the hue family of shape class ``kind`` (five hues 72 degrees apart, +-14)."""
    hue = (kind / len(CLS_SHAPES) + rng.uniform(-0.04, 0.04)) % 1.0  # neighbouring families never overlap
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.9), rng.uniform(0.8, 1.0))
    return int(red * 255), int(green * 255), int(blue * 255)


# name -> (cache folder name, generator). Adding a dataset adds a row here.
EMBEDDED = {
    "shapes-cls": (f"shapes-cls-v{SHAPES_CLS_VERSION}", generate_shapes_cls),
    "shapes-seg": (f"shapes-seg-v{SHAPES_SEG_VERSION}", generate_shapes_seg),
    "shapes-rgbd": (f"shapes-rgbd-v{SHAPES_RGBD_VERSION}", generate_shapes_rgbd),
    "shapes-det": (f"shapes-det-v{SHAPES_DET_VERSION}", generate_shapes_det),
    "shapes-inst": (f"shapes-inst-v{SHAPES_INST_VERSION}", generate_shapes_inst),
    "shapes-pose": (f"shapes-pose-v{SHAPES_POSE_VERSION}", generate_shapes_pose),
    "shapes-depth": (f"shapes-depth-v{SHAPES_DEPTH_VERSION}", generate_shapes_depth),
    "shapes-translation": (f"shapes-translation-v{SHAPES_TRANSLATION_VERSION}", generate_shapes_translation),
}


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def embedded_root(name: str) -> Path:
    """Folder of embedded dataset ``name``, generating it on first use."""
    folder, generate = EMBEDDED[name]
    return ensure_dataset(folder, generate)
