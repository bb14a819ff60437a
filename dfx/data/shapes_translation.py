"""The embedded ``shapes-translation`` set: a Taskonomy-like image-to-image translation task.

TokenFusion and GeminiFusion translate Taskonomy's *reshading* + *edge texture* into RGB. This set
builds the same three modalities from synthetic scenes where each input carries what the other
lacks:

- a height map: a tilted wall and 1-3 domed objects standing out of it (dome of the shape's
  circumradius, cut by the shape's outline); ``depth_zbuffer`` is that height as 8-bit (closer is
  brighter), written for three-input runs;
- ``reshading``: Lambertian shading of the height map's normals under one fixed light,
  ``0.15 + 0.85 * max(0, n . l)`` as grey (the geometry and the lighting, no colour or texture);
- ``edge_texture``: the Sobel magnitude of the albedo's luminance (where the wall texture and the
  objects' outlines change, no shading);
- ``rgb`` (the target): albedo times shading, where the albedo is the wall's (light, with dark lines:
  stripes or a grid at a random angle and spacing) or the object's colour, one hue per shape kind
  (so the colour follows from the outline the shading shows, and the lines from the edges).

Layout: ``rgb/``, ``reshading/``, ``edge_texture/``, ``depth_zbuffer/`` (``<id>.png``), ``train.txt``,
``val.txt``. Drawn at 2x and downsampled (Lanczos); ids ``train-00000``, ``val-00000``, ...; train
and val use disjoint random streams.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dfx.data.shapes import SHAPES, place_apart, shape_polygon

SHAPES_TRANSLATION_VERSION = 1
TRANSLATION_MODALITIES = ("rgb", "reshading", "edge_texture", "depth_zbuffer")
LIGHT = np.array([-0.45, -0.55, 0.70])  # towards the light, (x right, y down, z towards the camera)
EDGE_GAIN = 0.5  # Sobel magnitude (a 0-255 luminance, kernel sum 4) to 8-bit: the wall lines near 255


def shading_of(height: np.ndarray, light: np.ndarray = LIGHT, ambient: float = 0.15) -> np.ndarray:
    """``ambient + (1 - ambient) * max(0, n . l)`` of a height map [H, W] (pixel units, up = towards
    the camera), with normals ``(-dz/dx, -dz/dy, 1)`` normalised (central differences)."""
    dy, dx = np.gradient(height.astype(np.float64))
    normal = np.stack([-dx, -dy, np.ones_like(dx)], -1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    lit = normal @ (light / np.linalg.norm(light))
    return ambient + (1 - ambient) * np.clip(lit, 0, None)


def sobel_magnitude(gray: np.ndarray) -> np.ndarray:
    """|Sobel gradient| of a [H, W] image (edges replicated at the border)."""
    p = np.pad(gray.astype(np.float64), 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.hypot(gx, gy)


def shape_colour(kind: int) -> np.ndarray:
    """The albedo of shape kind ``kind``: one hue per kind, evenly spaced."""
    return np.array(colorsys.hsv_to_rgb(kind / len(SHAPES), 0.75, 0.95), dtype=np.float64) * 255


WALL, LINES = (205.0, 195.0, 175.0), (80.0, 70.0, 60.0)  # a light wall with dark lines


def wall_albedo(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """[H, W, 3]: a light wall (WALL) with dark lines (LINES), stripes or a grid at a random angle and
    spacing, plus mild noise. The lines are where edge_texture shows them; shading does not."""
    angle, period, width = rng.uniform(0, np.pi), rng.uniform(12, 26), rng.uniform(2.5, 4.5)
    u = xx * np.cos(angle) + yy * np.sin(angle) + rng.uniform(0, period)
    line = (u % period) < width
    if rng.random() < 0.5:  # a grid: lines across too
        v = -xx * np.sin(angle) + yy * np.cos(angle) + rng.uniform(0, period)
        line |= (v % period) < width
    albedo = np.where(line[..., None], np.array(LINES), np.array(WALL))
    return albedo + rng.normal(0, 3, albedo.shape)


def translation_scene(rng: np.random.Generator, big: int, radius: tuple[float, float] = (0.16, 0.28),
                      max_objects: int = 3) -> dict:
    """One scene at ``big`` x ``big``: ``height`` [H, W] (pixels), ``albedo`` [H, W, 3] (0-255)."""
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float64)
    albedo = wall_albedo(rng, xx, yy)
    height = rng.uniform(-0.15, 0.15) * xx + rng.uniform(-0.15, 0.15) * yy  # a gently tilted wall
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        r = rng.uniform(*radius) * big
        centre = place_apart(rng, r, big, placed)
        if centre is None:
            continue
        cx, cy = centre
        placed.append((cx, cy, r))
        kind, angle = int(rng.integers(len(SHAPES))), rng.uniform(0, 2 * np.pi)
        canvas = Image.new("L", (big, big), 0)
        ImageDraw.Draw(canvas).polygon(shape_polygon(SHAPES[kind], cx, cy, r, angle), fill=1)
        inside = np.asarray(canvas, dtype=bool)
        rho = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
        dome = rng.uniform(0.5, 0.9) * r * np.sqrt(np.clip(1 - rho ** 2, 0, None))
        height = np.where(inside, height + dome, height)
        albedo[inside] = shape_colour(kind)
    return {"height": height, "albedo": albedo}


def generate_shapes_translation(folder: Path, seed: int = 0, train_images: int = 800, val_images: int = 200,
                                size: int = 64) -> dict:
    """Write ``shapes-translation`` into ``folder`` (see the module docstring); returns its metadata."""
    big = size * 2
    for name in TRANSLATION_MODALITIES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for split, count, split_seed in (("train", train_images, seed), ("val", val_images, seed + 1)):
        rng = np.random.default_rng([SHAPES_TRANSLATION_VERSION, split_seed, 13])  # 13: a stream of its own
        ids = [f"{split}-{index:05d}" for index in range(count)]
        for sample_id in ids:
            scene = translation_scene(rng, big)
            shading = shading_of(scene["height"])
            luminance = scene["albedo"] @ np.array([0.299, 0.587, 0.114])
            height = scene["height"] - scene["height"].min()
            arrays = {"rgb": scene["albedo"] * shading[..., None],
                      "reshading": 255 * shading,
                      "edge_texture": EDGE_GAIN * sobel_magnitude(luminance),
                      "depth_zbuffer": 40 + 200 * height / max(height.max(), 1e-6)}
            for name, array in arrays.items():
                image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
                image.resize((size, size), Image.LANCZOS).save(folder / name / f"{sample_id}.png", optimize=False)
        (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"modalities": list(TRANSLATION_MODALITIES), "train_images": train_images, "val_images": val_images,
            "size": size, "seed": seed, "light": LIGHT.tolist()}
