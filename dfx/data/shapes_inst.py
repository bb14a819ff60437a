"""The embedded instance-segmentation dataset ``shapes-inst``: shapes-det's scenes with exact masks.

The images are shapes-det's, pixel for pixel (the same random stream per image: seed, split,
index). Every object's ``segmentation`` is the compressed COCO RLE of its visible pixels: the
pixels PIL painted for the shape and no later shape painted over, so masks never overlap and a
mask is exactly what the image shows. ``area`` is that pixel count and ``bbox`` the mask's extent
in COCO's continuous pixel coordinates (pixel i spans [i, i+1)), as COCO derives both from its
masks; shapes-det's boxes instead cover the occluded parts too.

Layout: the dfx COCO layout of shapes-det (``train/``, ``val/``, ``annotations/{train,val}.json``),
category ids 1, 3, 5, 7 (circle, square, triangle, cross).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dfx.data.shapes_det import (CATEGORY_IDS, CLASSES, EMPTY_EVERY, SHAPES_DET_VERSION, SIZE, SPLIT_CODES,
                                 scene_with_owner)

SHAPES_INST_VERSION = 1


def generate_shapes_inst(folder: Path, seed: int = 0, train_images: int = 2000, val_images: int = 200) -> dict:
    """Write the shapes-inst dataset into ``folder``; returns its metadata (classes, counts, seed)."""
    categories = [{"id": cid, "name": name} for cid, name in zip(CATEGORY_IDS, CLASSES)]
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_images), ("val", val_images)):
        (folder / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([SHAPES_DET_VERSION, seed, SPLIT_CODES[split], index])
            pixels, objects, owner = scene_with_owner(rng, empty=index % EMPTY_EVERY == EMPTY_EVERY // 2)
            file_name = f"{index:06d}.png"
            Image.fromarray(pixels).save(folder / split / file_name, compress_level=1)
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE})
            for number, (category_id, _, _) in enumerate(objects, start=1):
                visible = owner == number
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                    "segmentation": mask_rle(visible), "bbox": mask_box(visible),
                                    "area": int(visible.sum()), "iscrowd": 0})
        info = {"description": "dfx shapes-inst: synthetic shapes for instance segmentation",
                "version": SHAPES_INST_VERSION, "seed": seed}
        document = {"info": info, "images": images, "annotations": annotations, "categories": categories}
        (folder / "annotations" / f"{split}.json").write_text(json.dumps(document))
    return {"classes": list(CLASSES), "category_ids": list(CATEGORY_IDS), "train_images": train_images,
            "val_images": val_images, "size": SIZE, "seed": seed}


def mask_rle(mask: np.ndarray) -> dict:
    """bool [H, W] -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def mask_box(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] of a non-empty bool [H, W] mask: from its first pixel's edge to its last pixel's far edge."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
