"""Synthetic shape scenes: the drawing primitives behind dfx's embedded datasets.

Everything is driven by a ``numpy.random.Generator``, so a seed fixes every pixel.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
# the classification set: silhouettes that stay distinct at 32x32 (a hexagon looks round there)
CLS_SHAPES = ("circle", "square", "triangle", "star", "cross")


def shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``kind`` centred at (cx, cy) with circumradius ``radius``, rotated by ``angle`` rad."""
    if kind == "circle":
        n, radii = 48, [1.0]
    elif kind == "square":
        n, radii, angle = 4, [1.0], angle + math.pi / 4
    elif kind == "triangle":
        n, radii = 3, [1.0]
    elif kind == "hexagon":
        n, radii = 6, [1.0]
    elif kind == "star":
        n, radii = 10, [1.0, 0.45]
    elif kind == "cross":
        # a plus sign: 12 vertices at two radii and fixed angles
        w = 0.34
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    return [
        (cx + radius * radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
         cy + radius * radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]


def textured_background(rng: np.random.Generator, height: int, width: int,
                        brightness: tuple[float, float] = (40, 215)) -> np.ndarray:
    """A uint8 [H, W, 3] background: gradient, stripes, blotches or checkers, plus noise.

    ``brightness``: range of the base colour's channel values.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(*brightness, size=3)
    # the texture's second colour stays near the first: the background is busy, but the shape on
    # top of it (contrasting_colour) remains the strongest edge in the image
    other = np.clip(base + rng.uniform(-45, 45, size=3), 0, 255)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(theta) + yy * math.sin(theta)) / max(height, width)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == 1:  # stripes
        theta = rng.uniform(0, math.pi)
        freq = rng.uniform(0.15, 0.6)
        t = 0.5 + 0.5 * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    elif kind == 2:  # smooth blotches: coarse noise upsampled
        coarse = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)) / 255.0
    else:  # checkers
        cell = int(rng.integers(3, 9))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    image = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


LUMA = np.array([0.299, 0.587, 0.114])


def contrasting_colour(rng: np.random.Generator, background: np.ndarray, min_distance: float = 120.0,
                       brighter_by: float | None = None) -> tuple:
    """A random RGB colour at least ``min_distance`` (Euclidean) from the background's mean.

    ``brighter_by``: also require the colour's luminance to exceed the background's by this much,
    so every shape stands out with the same polarity whatever its hue.
    """
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(200):
        colour = rng.integers(0, 256, size=3)
        if np.linalg.norm(colour - mean) < min_distance:
            continue
        if brighter_by is not None and LUMA @ colour < LUMA @ mean + brighter_by:
            continue
        break
    return tuple(int(c) for c in colour)


def place_apart(rng: np.random.Generator, radius: float, size: float, placed: list[tuple[float, float, float]],
                tries: int = 30) -> tuple[float, float] | None:
    """A centre for a disc of ``radius`` inside a ``size`` square that overlaps none of the ``placed``
    discs ``(x, y, r)``, by rejection sampling; None after ``tries`` draws."""
    for _ in range(tries):
        cx, cy = rng.uniform(radius, size - radius, size=2)
        if all(np.hypot(cx - x, cy - y) > radius + r for x, y, r in placed):
            return cx, cy
    return None


def draw_shape(image: Image.Image, kind: str, cx: float, cy: float, radius: float, angle: float, colour) -> None:
    ImageDraw.Draw(image).polygon(shape_polygon(kind, cx, cy, radius, angle), fill=colour)
