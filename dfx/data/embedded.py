"""Embedded datasets: generated deterministically on first use, cached, verified by checksum.

``data.root`` may name one of these instead of a folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dfx.data.cache import ensure_dataset
from dfx.data.shapes import CLS_SHAPES, contrasting_colour, draw_shape, textured_background

SHAPES_CLS_VERSION = 2


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


# name -> (cache folder name, generator). Adding a dataset adds a row here.
EMBEDDED = {
    "shapes-cls": (f"shapes-cls-v{SHAPES_CLS_VERSION}", generate_shapes_cls),
}


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def embedded_root(name: str) -> Path:
    """Folder of embedded dataset ``name``, generating it on first use."""
    folder, generate = EMBEDDED[name]
    return ensure_dataset(folder, generate)
