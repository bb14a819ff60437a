"""The embedded ``shapes-rgbd`` dataset: synthetic RGB-D(-E-L) scenes where both modalities matter.

Every scene is a textured background and 1-3 objects of four classes. The class is the object's
hue family (red, lime, cyan, violet), which only RGB shows; where the object is, is shown fully
only by depth:

- *visible* objects: filled with their class colour in RGB, raised in depth;
- *camouflaged* objects: in RGB the background texture runs through them except for a small
  spot of their class colour at the centre, so RGB alone finds the spot but not the extent;
  depth shows the whole object;
- *decoys* (pictures on the wall): a coloured shape in RGB but flat in depth, labelled background.

So an RGB-only model misses most of every camouflaged object and labels decoys, a depth-only
model finds objects but cannot name them, and a fused model can do both. Two extra channels
serve the more-than-two-modality path: ``event`` (signed edges of everything that moved one
step, like an event camera) and ``lidar`` (depth on sparse scan lines, zero elsewhere).

Layout (dfx.data.multimodal): ``rgb/``, ``depth/``, ``event/``, ``lidar/``, ``labels/``
(``<id>.png``), ``classes.txt``, ``train.txt``, ``val.txt``.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfx.data.shapes import SHAPES, place_apart, shape_polygon, textured_background

SHAPES_RGBD_VERSION = 1
SHAPES_DEPTH_VERSION = 2
DEPTH_SET_MAX = 10.0  # shapes-depth: an 8-bit depth value v is v * 10 / 255 metres
AIRLIGHT = 220.0  # the haze's colour (grey) in shapes-depth
RGBD_CLASSES = ("background", "red", "lime", "cyan", "violet")
MODALITIES = ("rgb", "depth", "event", "lidar")


def hue_colour(rng: np.random.Generator, kind: int) -> tuple:
    """A bright colour in hue family ``kind`` of four (90 degrees apart, +-18 degrees)."""
    hue = (kind / 4 + rng.uniform(-0.05, 0.05)) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.95), rng.uniform(0.75, 1.0))
    return int(red * 255), int(green * 255), int(blue * 255)


def _mask(polygon, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _scene(rng: np.random.Generator, big: int, radius: tuple[float, float], max_objects: int,
           camouflage: float, decoy: float, wall_brightness: tuple[float, float] = (30, 200)) -> dict:
    """One scene at ``big`` x ``big``: rgb uint8 [H, W, 3], depth float [H, W], label, motion masks."""
    rgb = textured_background(rng, big, big, brightness=wall_brightness).astype(np.float32)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / big
    depth = rng.uniform(50, 90) + rng.uniform(-30, 30) * xx + rng.uniform(-30, 30) * yy  # a tilted wall
    label = np.zeros((big, big), dtype=np.uint8)
    moved = np.zeros((big, big), dtype=np.float32)  # +1 where something arrived, -1 where it left
    placed: list[tuple[float, float, float]] = []
    count = int(rng.integers(1, max_objects + 1))
    roles = ["camouflaged" if rng.random() < camouflage else "visible" for _ in range(count)]
    if rng.random() < decoy:
        roles.append("decoy")
    for role in roles:
        r = rng.uniform(*radius) * big
        centre = place_apart(rng, r, big, placed)  # objects never overlap
        if centre is None:
            continue
        cx, cy = centre
        placed.append((cx, cy, r))
        kind, shape, angle = int(rng.integers(4)), SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(0, 2 * np.pi)
        inside = _mask(shape_polygon(shape, cx, cy, r, angle), big)
        colour = np.array(hue_colour(rng, kind), dtype=np.float32)
        if role == "camouflaged":
            spot = _mask(shape_polygon("circle", cx, cy, 0.3 * r, 0), big)
            rgb[spot] = colour
        else:
            rgb[inside] = colour
        if role != "decoy":
            depth[inside] += rng.uniform(60, 110)  # closer than the wall: brighter
            label[inside] = kind + 1
        step = rng.integers(-2, 3, size=2)
        after = _mask(shape_polygon(shape, cx + step[0], cy + step[1], r, angle), big)
        moved += after.astype(np.float32) - inside
    return {"rgb": rgb, "depth": depth, "label": label, "moved": moved}


def generate_shapes_rgbd(folder: Path, seed: int = 0, train_images: int = 1000, val_images: int = 250,
                         size: int = 64, radius: tuple[float, float] = (0.16, 0.28), max_objects: int = 3,
                         camouflage: float = 0.5, decoy: float = 0.6, haze: float = 0.0,
                         wall_brightness: tuple[float, float] = (30, 200)) -> dict:
    """Write ``shapes-rgbd`` into ``folder`` (see the module docstring); returns its metadata.

    ``camouflage``: share of objects camouflaged in RGB; ``decoy``: chance that a scene holds a
    decoy. ``haze`` (per metre, reading the 8-bit depth as ``value * 10 / 255`` metres): RGB seen
    through scattering air, ``rgb * T + 220 * (1 - T)`` with transmission ``T = exp(-haze *
    metres)`` (Koschmieder's law), so that RGB alone tells how far a pixel is (the embedded depth
    set, ``shapes-depth``); 0 leaves RGB as drawn. ``wall_brightness``: the range of the wall
    texture's base colour (a narrow range makes the haze over it readable). Drawn at 2x and downsampled (Lanczos for images,
    nearest for labels); ids ``train-00000``, ``val-00000``, ...; train and val use disjoint random
    streams.
    """
    big = size * 2
    for name in (*MODALITIES, "labels"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in RGBD_CLASSES))
    for split, count, split_seed in (("train", train_images, seed), ("val", val_images, seed + 1)):
        rng = np.random.default_rng([SHAPES_RGBD_VERSION, split_seed, 11])  # 11: a stream of its own
        ids = [f"{split}-{index:05d}" for index in range(count)]
        for sample_id in ids:
            scene = _scene(rng, big, radius, max_objects, camouflage, decoy, wall_brightness)
            depth = np.clip(scene["depth"] + rng.normal(0, 3, size=scene["depth"].shape), 0, 255)
            if haze > 0:
                transmission = np.exp(-haze * np.clip(scene["depth"], 0, 255) * (DEPTH_SET_MAX / 255))[..., None]
                scene["rgb"] = scene["rgb"] * transmission + AIRLIGHT * (1 - transmission)
            event = np.clip(128 + 110 * scene["moved"] + rng.normal(0, 6, size=depth.shape), 0, 255)
            lidar = np.zeros_like(depth)
            # scan lines every 6 rows at 2x (3 px at full size), on the odd rows that nearest-neighbour
            # downsampling keeps
            rows = np.arange(1, big, 6)
            hits = rng.random((len(rows), big)) < 0.7
            lidar[rows] = np.where(hits, depth[rows], 0)
            images = {"rgb": Image.fromarray(np.clip(scene["rgb"], 0, 255).astype(np.uint8)),
                      "depth": Image.fromarray(depth.astype(np.uint8)),
                      "event": Image.fromarray(event.astype(np.uint8))}
            for name, image in images.items():
                image.resize((size, size), Image.LANCZOS).save(folder / name / f"{sample_id}.png", optimize=False)
            # sparse returns must stay sparse: nearest, not Lanczos
            Image.fromarray(lidar.astype(np.uint8)).resize((size, size), Image.NEAREST).save(
                folder / "lidar" / f"{sample_id}.png", optimize=False)
            Image.fromarray(scene["label"]).resize((size, size), Image.NEAREST).save(
                folder / "labels" / f"{sample_id}.png", optimize=False)
        (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"classes": list(RGBD_CLASSES), "modalities": list(MODALITIES), "train_images": train_images,
            "val_images": val_images, "size": size, "seed": seed, "camouflage": camouflage, "decoy": decoy,
            **({"haze": haze, "depth_max": DEPTH_SET_MAX, "wall_brightness": list(wall_brightness)}
               if haze > 0 else {})}


def generate_shapes_depth(folder: Path, seed: int = 0) -> dict:
    """The embedded depth set ``shapes-depth``: shapes-rgbd scenes without camouflage or decoys, seen
    through haze (0.3 per metre) over a wall of known darkness (texture base colour 50-70), so that
    depth can be read from RGB: how far the haze has washed a pixel towards grey. Depth PNGs are 8-bit,
    ``metres = value * 10 / 255`` (``data.depth_max: 10``): a tilted wall 0.8-4.7 m away with
    objects 2.4-4.3 m behind its surface; no return (0) where the noise clips it."""
    return generate_shapes_rgbd(folder, seed=seed, camouflage=0.0, decoy=0.0, haze=0.3, wall_brightness=(50, 70))
