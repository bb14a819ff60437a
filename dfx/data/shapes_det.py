"""The embedded detection dataset ``shapes-det``: COCO-format scenes of overlapping shapes.

Layout (the dfx layout of dfx.data.coco): ``train/000000.png ...``, ``val/000000.png ...``,
``annotations/train.json``, ``annotations/val.json``. Category ids are 1, 3, 5, 7 (circle, square,
triangle, cross): not contiguous, like COCO's, so the id <-> label mapping is always exercised.

Each 256x256 image: a textured background and 1 to 6 shapes (none in every 32nd image), each of a
random class, rotation, colour (contrasting with the background and with the shapes it covers)
and circumradius in [6.5, 90] px (log-uniform, tilted toward larger shapes), so COCO's small
(< 32^2 px), medium and large (> 96^2 px) area buckets all occur. Later shapes are drawn over
earlier ones, but a shape is only placed where it leaves every earlier shape at least half
visible (otherwise it is re-placed, or left out after 20 tries). A box is the shape's full extent (occluded parts included) clipped to
the image, in COCO's continuous pixel coordinates (pixel i spans [i, i+1)); ``area`` is the
shape's pixel count in the image, occluded parts included, like its box.

Every image has its own random stream (seed, split, index), so the first n images of a split do
not depend on how many are generated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfx.data.shapes import contrasting_colour, draw_shape, shape_polygon, textured_background

SHAPES_DET_VERSION = 2
CLASSES = ("circle", "square", "triangle", "cross")
CATEGORY_IDS = (1, 3, 5, 7)
SIZE = 256
MAX_OBJECTS = 6
RADIUS = (6.5, 90.0)  # circumradius range in px; the smallest shape is still ~13 px across
# log-uniform radii give ~45% small objects and ~6% large; raising u to this power tilts the draw
# toward larger shapes: 22% small, 61% medium, 17% large in train (val: 18 / 61 / 21; COCO val:
# 41 / 34 / 24). Fewer tiny shapes than COCO keeps the CPU quickstart's 160 px inputs meaningful.
RADIUS_TILT = 0.5
EMPTY_EVERY = 32  # every 32nd image (index % 32 == 16) has no objects: ~3%
MAX_HIDDEN = 0.5  # no shape may lose more than this share of its pixels to later shapes
PLACEMENT_TRIES = 20
SPLIT_CODES = {"train": 0, "val": 1}


def generate_shapes_det(folder: Path, seed: int = 0, train_images: int = 2000, val_images: int = 200) -> dict:
    """Write the shapes-det dataset into ``folder``; returns its metadata (classes, counts, seed)."""
    categories = [{"id": cid, "name": name} for cid, name in zip(CATEGORY_IDS, CLASSES)]
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_images), ("val", val_images)):
        (folder / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([SHAPES_DET_VERSION, seed, SPLIT_CODES[split], index])
            pixels, objects = scene(rng, empty=index % EMPTY_EVERY == EMPTY_EVERY // 2)
            file_name = f"{index:06d}.png"
            # compress_level 1: the noisy backgrounds barely compress anyway, and level 6 is slower
            Image.fromarray(pixels).save(folder / split / file_name, compress_level=1)
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE})
            for category_id, bbox, area in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                    "bbox": bbox, "area": area, "iscrowd": 0})
        info = {"description": "dfx shapes-det: synthetic shapes for detection", "version": SHAPES_DET_VERSION,
                "seed": seed}
        document = {"info": info, "images": images, "annotations": annotations, "categories": categories}
        (folder / "annotations" / f"{split}.json").write_text(json.dumps(document))
    return {"classes": list(CLASSES), "category_ids": list(CATEGORY_IDS), "train_images": train_images,
            "val_images": val_images, "size": SIZE, "seed": seed}


def scene(rng: np.random.Generator, empty: bool = False) -> tuple[np.ndarray, list[tuple[int, list[float], int]]]:
    """One image uint8 [SIZE, SIZE, 3] and its objects ``(category_id, [x, y, w, h], area)``."""
    pixels, objects, _ = scene_with_owner(rng, empty)
    return pixels, objects


def scene_with_owner(rng: np.random.Generator, empty: bool = False):
    """:func:`scene` and its owner map int16 [SIZE, SIZE]: 0 where the background shows, i + 1 where
    object i (in the order of ``objects``) is the one on top (its visible pixels)."""
    # textured at half size and upsampled: a third of the cost, and the pixel noise turns into grain
    image = Image.fromarray(textured_background(rng, SIZE // 2, SIZE // 2, brightness=(20, 140)))
    image = image.resize((SIZE, SIZE), Image.BILINEAR)
    # contrasting_colour only needs the background's mean colour: pass it once instead of 65k pixels
    background_mean = np.asarray(image).reshape(-1, 3).mean(0, keepdims=True)
    owner = np.zeros((SIZE, SIZE), dtype=np.int16)  # 0 = background, i + 1 = shape i is on top here
    full, visible, colours, objects = [], [], [], []
    for _ in range(0 if empty else int(rng.integers(1, MAX_OBJECTS + 1))):
        kind = int(rng.integers(len(CLASSES)))
        radius = RADIUS[0] * (RADIUS[1] / RADIUS[0]) ** (rng.uniform() ** RADIUS_TILT)
        angle = rng.uniform(0, 2 * math.pi)
        placed = place(rng, CLASSES[kind], radius, angle, owner, full, visible)
        if placed is None:
            continue
        (cx, cy), mask, hidden = placed
        covered = [colours[i] for i in np.flatnonzero(hidden)]
        colour = distinct_colour(rng, background_mean, covered)
        # PIL puts integer coordinates at pixel centres; the shape lives in continuous coordinates
        draw_shape(image, CLASSES[kind], cx - 0.5, cy - 0.5, radius, angle, colour)
        for i in np.flatnonzero(hidden):
            visible[i] -= int(hidden[i])
        owner[mask] = len(full) + 1
        area = int(mask.sum())
        full.append(area)
        visible.append(area)
        colours.append(colour)
        objects.append((CATEGORY_IDS[kind], box_of(shape_polygon(CLASSES[kind], cx, cy, radius, angle)), area))
    return np.asarray(image), objects, owner


def place(rng, kind, radius, angle, owner, full, visible):
    """A centre where the shape leaves every earlier shape at least (1 - MAX_HIDDEN) visible.

    Returns ``((cx, cy), mask [SIZE, SIZE] bool, hidden [n] pixels it covers of each earlier
    shape)`` or None after PLACEMENT_TRIES. Centres keep at least 30% of the radius inside the
    image, so a shape may be cut by the border but never mostly outside it.
    """
    margin = min(0.3 * radius, SIZE / 2)
    for _ in range(PLACEMENT_TRIES):
        cx, cy = rng.uniform(margin, SIZE - margin, size=2)
        mask = polygon_mask(shape_polygon(kind, cx - 0.5, cy - 0.5, radius, angle))
        if not mask.any():
            continue
        hidden = np.bincount(owner[mask], minlength=len(full) + 1)[1:]
        if all(visible[i] - hidden[i] >= (1 - MAX_HIDDEN) * full[i] for i in np.flatnonzero(hidden)):
            return (cx, cy), mask, hidden
    return None


def polygon_mask(polygon: list[tuple[float, float]]) -> np.ndarray:
    """bool [SIZE, SIZE]: the pixels PIL fills for ``polygon`` (the same pixels draw_shape paints)."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def distinct_colour(rng: np.random.Generator, background: np.ndarray, covered: list[tuple], min_distance: float = 90.0):
    """A colour brighter than ``background`` (pixels [..., 3]) and ``min_distance`` from each covered shape's colour."""
    for _ in range(20):
        colour = contrasting_colour(rng, background, brighter_by=60)
        if all(np.linalg.norm(np.subtract(colour, other)) >= min_distance for other in covered):
            break
    return colour


def box_of(polygon: list[tuple[float, float]]) -> list[float]:
    """[x, y, w, h] of the polygon's extent clipped to the image, rounded to 1/100 px."""
    xs, ys = zip(*polygon)
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(SIZE), max(xs)), min(float(SIZE), max(ys))
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
