"""The embedded pose dataset ``shapes-pose``: articulated stick figures with named keypoints.

Layout as ``shapes-det`` (the dfx COCO layout): ``train/000000.png ...``, ``val/...``,
``annotations/train.json``, ``annotations/val.json``, in COCO person-keypoints form: one category
``figure`` (id 1) with ``keypoints`` (the :data:`KEYPOINTS` names), a 1-based ``skeleton`` and, as
a dfx extension that ``dfx eval`` and training read, the per-keypoint OKS ``sigmas``.

Each 256x256 image: a textured background and 1 to 3 figures (none in every 32nd image). A figure
faces the viewer: its left limbs are on the image's right, as for a COCO person seen from the front,
so a horizontal flip with the left/right keypoints swapped is again a valid figure. It stands upright
within +-35 degrees, with a torso of 22-60 px, arms and legs of two segments at random joint angles,
a disc for the head and round joints, all in one colour that contrasts with the background. Later
figures are drawn over earlier ones; a keypoint of an earlier figure that ends up under a later one
is marked v=1 (labelled, occluded), the others v=2. A keypoint outside the image is v=0 (0, 0).
``bbox`` is the figure's drawn extent clipped to the image; ``area`` is 0.53 x the box area (the
share mmpose and others take for people without a mask; a stick figure's pixel count would make
OKS needlessly strict), ``num_keypoints`` counts v > 0.

Every image has its own random stream (seed, split, index), like shapes-det.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfx.data.shapes import contrasting_colour, textured_background

SHAPES_POSE_VERSION = 1
SIZE = 256
KEYPOINTS = ("head", "neck", "left_elbow", "right_elbow", "left_hand", "right_hand", "pelvis", "left_knee",
             "right_knee", "left_foot", "right_foot")
# 1-based pairs as COCO writes them
SKELETON = ((1, 2), (2, 3), (3, 5), (2, 4), (4, 6), (2, 7), (7, 8), (8, 10), (7, 9), (9, 11))
FLIP_PAIRS = ((2, 3), (4, 5), (7, 8), (9, 10))  # 0-based left <-> right
# OKS sigmas in the spirit of COCO's (0.026 eyes ... 0.107 hips): the head is the easiest to place,
# the limb ends the hardest
SIGMAS = (0.05, 0.06, 0.07, 0.07, 0.08, 0.08, 0.07, 0.07, 0.07, 0.08, 0.08)
MAX_FIGURES = 3
EMPTY_EVERY = 32
SPLIT_CODES = {"train": 0, "val": 1}
CATEGORY = {"id": 1, "name": "figure", "supercategory": "figure", "keypoints": list(KEYPOINTS),
            "skeleton": [list(p) for p in SKELETON], "sigmas": list(SIGMAS)}


def generate_shapes_pose(folder: Path, seed: int = 0, train_images: int = 1500, val_images: int = 200) -> dict:
    """Write the shapes-pose dataset into ``folder``; returns its metadata."""
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_images), ("val", val_images)):
        (folder / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([SHAPES_POSE_VERSION, seed, SPLIT_CODES[split], index])
            pixels, figures = scene(rng, empty=index % EMPTY_EVERY == EMPTY_EVERY // 2)
            file_name = f"{index:06d}.png"
            Image.fromarray(pixels).save(folder / split / file_name, compress_level=1)
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE})
            for bbox, keypoints in figures:
                labelled = int((np.asarray(keypoints[2::3]) > 0).sum())
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                    "bbox": bbox, "area": round(0.53 * bbox[2] * bbox[3], 2), "iscrowd": 0,
                                    "num_keypoints": labelled, "keypoints": keypoints})
        info = {"description": "dfx shapes-pose: synthetic articulated figures for keypoint detection",
                "version": SHAPES_POSE_VERSION, "seed": seed}
        document = {"info": info, "images": images, "annotations": annotations, "categories": [CATEGORY]}
        (folder / "annotations" / f"{split}.json").write_text(json.dumps(document))
    return {"classes": ["figure"], "keypoints": list(KEYPOINTS), "train_images": train_images,
            "val_images": val_images, "size": SIZE, "seed": seed}


def figure_points(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The 11 keypoints [11, 2] of one figure in image pixels (continuous coordinates), and its
    limb width. The figure's own x axis points to the image's right; its left side is +x."""
    torso = rng.uniform(22, 60)
    tilt = math.radians(rng.uniform(-35, 35))
    up = np.array([math.sin(tilt), -math.cos(tilt)])  # image y grows downward
    right = np.array([-up[1], up[0]])  # the figure's +x: its left side, on the image's right
    pelvis = np.zeros(2)
    neck = pelvis + torso * up
    head = neck + 0.45 * torso * up
    points = {"pelvis": pelvis, "neck": neck, "head": head}
    for side, sign in (("left", 1.0), ("right", -1.0)):
        for joint, end, root, length, spread in (("elbow", "hand", neck, 0.55, (20, 160)),
                                                 ("knee", "foot", pelvis, 0.65, (10, 60))):
            angle = math.radians(rng.uniform(*spread))  # from straight down, outward to the figure's side
            bend = math.radians(rng.uniform(-60, 60))
            first = sign * math.sin(angle) * right - math.cos(angle) * up
            second_angle = angle + bend
            second = sign * math.sin(second_angle) * right - math.cos(second_angle) * up
            middle = root + length * torso * first
            points[f"{side}_{joint}"] = middle
            points[f"{side}_{end}"] = middle + length * torso * second
    return np.stack([points[name] for name in KEYPOINTS]), max(2.0, torso / 9)


def draw_figure(draw: ImageDraw.ImageDraw, points: np.ndarray, width: float, colour) -> None:
    """Limbs as thick lines, round joints, the head as a disc (PIL puts integers at pixel centres)."""
    shifted = points - 0.5
    for a, b in SKELETON:
        draw.line([tuple(shifted[a - 1]), tuple(shifted[b - 1])], fill=colour, width=int(round(width)))
    for x, y in shifted:
        r = width * 0.6
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    head, neck = shifted[0], shifted[1]
    r = 0.3 * float(np.hypot(*(head - neck)))
    draw.ellipse([head[0] - r, head[1] - r, head[0] + r, head[1] + r], fill=colour)


def scene(rng: np.random.Generator, empty: bool = False) -> tuple[np.ndarray, list[tuple[list[float], list]]]:
    """One image uint8 [SIZE, SIZE, 3] and its figures ``([x, y, w, h], [x1, y1, v1, ...])``."""
    image = Image.fromarray(textured_background(rng, SIZE // 2, SIZE // 2, brightness=(20, 140)))
    image = image.resize((SIZE, SIZE), Image.BILINEAR)
    background_mean = np.asarray(image).reshape(-1, 3).mean(0, keepdims=True)
    owner = np.zeros((SIZE, SIZE), dtype=np.int16)  # 0 = background, i + 1 = figure i is on top here
    placed: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(0 if empty else int(rng.integers(1, MAX_FIGURES + 1))):
        points, width = figure_points(rng)
        low, high = points.min(0), points.max(0)
        # the figure's box centre lands in the inner 70% of the image: figures may leave it a little
        centre = rng.uniform(0.15 * SIZE, 0.85 * SIZE, size=2)
        points = points - (low + high) / 2 + centre
        layer = Image.new("L", (SIZE, SIZE), 0)
        draw_figure(ImageDraw.Draw(layer), points, width, 255)
        mask = np.asarray(layer) > 0
        if mask.sum() < 40:
            continue
        colour = contrasting_colour(rng, background_mean, min_distance=120.0)
        draw_figure(ImageDraw.Draw(image), points, width, colour)
        owner[mask] = len(placed) + 1
        placed.append((points, mask))
    figures = []
    for i, (points, mask) in enumerate(placed):
        ys, xs = np.nonzero(mask)  # the figure's drawn pixels, occluded ones included
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1
        keypoints = []
        for x, y in points:
            inside = 0 <= x < SIZE and 0 <= y < SIZE
            if not inside:
                keypoints += [0, 0, 0]
                continue
            v = 1 if owner[int(y), int(x)] > i + 1 else 2
            keypoints += [round(float(x), 2), round(float(y), 2), v]
        figures.append(([round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], keypoints))
    return np.asarray(image), figures
