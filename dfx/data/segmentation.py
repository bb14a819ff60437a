"""Semantic segmentation data: RGB images with per-pixel class-id label maps.

Layout of a dataset root (the embedded ``shapes-seg`` is written the same way):

    <root>/classes.txt         one class name a line; line i names class id i
    <root>/train.txt, val.txt  one sample id a line
    <root>/images/<id>.png     the RGB image (.jpg / .jpeg are accepted too)
    <root>/labels/<id>.png     uint8 class ids [H, W], the image's size; 255 = ignore (not scored)

A sample is ``(image [3, S, S] float (normalised), label [S, S] int64)``. Training augmentation is a
random resized crop and a horizontal flip drawn once and applied to both (torchvision
``transforms.v2`` with the label as a ``Mask``: bilinear for the image, nearest for the label, so
label values stay class ids). Evaluation resizes both to S×S the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dfx.data.images import load_rgb
from dfx.errors import UsageError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT = ("expected <root>/classes.txt, <root>/{train,val}.txt (ids), <root>/images/<id>.png and "
          "<root>/labels/<id>.png")


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of ``path``; errors name the file and the layout."""
    if not path.is_file():
        raise UsageError(f"data.root: {path} does not exist ({what}); {LAYOUT}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"data.root: {path} is empty ({what})")
    return lines


class SegmentationFolder(Dataset):
    """The ``split`` of a segmentation root: ``(image, label)`` pairs through ``transform``.

    Missing files are reported when the dataset is built; a label whose size differs from its
    image, or whose values are neither class ids in [0, num_classes) nor 255, when it is read.
    """

    def __init__(self, root: str | Path, split: str, transform=None):
        self.root = Path(root)
        self.transform = transform
        self.classes = read_lines(self.root / "classes.txt", "class names, one a line")
        ids = read_lines(self.root / f"{split}.txt", f"ids of the {split} split, one a line")
        self.samples = [(self._image_path(i), self._label_path(i)) for i in ids]

    def _image_path(self, sample_id: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "images" / f"{sample_id}{suffix}"
            if path.is_file():
                return path
        raise UsageError(f"data.root: image {self.root / 'images' / sample_id}.png of id {sample_id!r} is missing "
                         f"(also looked for {', '.join(IMAGE_SUFFIXES[1:])})")

    def _label_path(self, sample_id: str) -> Path:
        path = self.root / "labels" / f"{sample_id}.png"
        if not path.is_file():
            raise UsageError(f"data.root: label {path} of id {sample_id!r} is missing")
        return path

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The raw pair: an RGB image and its checked uint8 label map [H, W]."""
        image_path, label_path = self.samples[index]
        image = load_rgb(str(image_path))
        label = read_label(label_path)
        if label.shape != (image.height, image.width):
            raise UsageError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                             f"{image.width}x{image.height} (width x height); they must match pixel for pixel")
        bad = np.setdiff1d(np.unique(label), [*range(self.num_classes), IGNORE_INDEX])
        if bad.size:
            raise UsageError(f"label {label_path} holds values {bad[:8].tolist()}: class ids must be in "
                             f"[0, {self.num_classes}) ({self.num_classes} classes in classes.txt) or "
                             f"{IGNORE_INDEX} (ignore)")
        return image, label

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        return self.transform(image, label)


def read_label(path: Path) -> np.ndarray:
    """A label PNG as uint8 class ids [H, W] (grey or palette PNGs: palette indices are the ids)."""
    try:
        with Image.open(path) as label:
            if label.mode not in ("L", "P"):
                raise UsageError(f"label {path} has mode {label.mode}: expected a single-channel 8-bit PNG of class "
                                 "ids (mode L or P)")
            return np.array(label, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"cannot read label {path}: {e}; remove or replace the file") from None


class SegmentationTransform:
    """``(PIL image, uint8 label [H, W]) -> (image [3, S, S] float, label [S, S] int64)``.

    Training: random resized crop (area share ``scale``, aspect ``ratio``) to S×S and horizontal
    flip with probability ``hflip``, the same draw for image and label. Evaluation: resize to S×S.
    Random draws come from torch's global generator (seeded per sample by SeededDataset).
    """

    def __init__(self, image_size: int, training: bool, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        size = (image_size, image_size)
        if training:
            geometry = [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
                        v2.RandomHorizontalFlip(hflip)]
        else:
            geometry = [v2.Resize(size, antialias=True)]
        # Masks are resized with nearest neighbours and skipped by ToDtype(scale) and Normalize.
        to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
        self.pipeline = v2.Compose([*geometry, to_float, v2.Normalize(mean=list(mean), std=list(std))])

    def __call__(self, image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        image_out, label_out = self.pipeline(tv_tensors.Image(pil_to_tensor(image)),
                                             tv_tensors.Mask(torch.from_numpy(label)))
        return image_out.as_subclass(torch.Tensor), label_out.as_subclass(torch.Tensor).long()
