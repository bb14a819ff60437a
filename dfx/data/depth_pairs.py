"""RGB + depth pairs for monocular depth: NYU-style folders and explicit file lists.

A split file (``data.train_split`` / ``data.val_split``, relative to the root or absolute) has one
sample a line, either

- an id: ``<root>/<images>/<id>.{png,jpg,jpeg,ppm}`` and ``<root>/<depths>/<id>.{png,pgm}``
  (folder names ``data.images`` / ``data.depths``; the embedded ``shapes-depth`` and the usual
  NYU export layout ``rgb/`` + ``depth/``), or
- two paths, image then depth, relative to the root (or absolute), and any further fields ignored:
  the BTS / AdaBins lists ``/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png
  518.8579`` work as they are (a leading ``/`` that does not exist on disk is read under the root;
  lines whose depth is ``None``, as in KITTI's lists, are left out and counted).

Depth files are decoded to metres by dfx.data.depth (16-bit PNG in millimetres or
``data.depth_scale`` units per metre, SUN RGB-D's rotated bits, NYU raw ``.pgm``, 8-bit depth
PNGs on the ``depth_max`` scale); zero is "no return" everywhere.

A sample is ``(image [3, h, w] normalised, depth [H, W] metres)``: for training both are cropped,
resized and flipped alike (one random resized crop; depth nearest-neighbour, so no invented depth
between an object and its background, and zeros stay zeros); for evaluation the image is resized
to ``size`` and the depth keeps its own resolution (metrics are computed at the ground truth's
size). :func:`collate_depth` pads depths with zeros (no return) into one batch and keeps their sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dfx.data.depth import DepthFormat, read_depth_target
from dfx.data.images import load_rgb
from dfx.data.segmentation import read_lines
from dfx.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
DEPTH_SUFFIXES = (".png", ".pgm", ".tif", ".tiff")
LAYOUT = ("expected <root>/<split file> listing ids (with <root>/rgb/<id>.png and <root>/depth/<id>.png) or "
          "'image depth' path pairs (see docs/depth.md)")


class DepthPairs(Dataset):
    """The pairs a split file lists; missing files are named when the dataset is built."""

    def __init__(self, root: str | Path, split_file: str, images: str = "rgb", depths: str = "depth",
                 depth: DepthFormat = DepthFormat(), transform=None):
        self.root = Path(root)
        self.images, self.depths, self.depth, self.transform = images, depths, depth, transform
        if not self.root.is_dir():
            raise UsageError(f"data.root: {self.root} does not exist; {LAYOUT}")
        listing = Path(split_file) if Path(split_file).is_absolute() else self.root / split_file
        lines = read_lines(listing, "one sample a line")
        # KITTI's Eigen lists name no ground truth ("None") for some frames: left out, counted
        self.without_depth = sum(1 for line in lines if len(line.split()) > 1 and line.split()[1] == "None")
        self.samples = [self._paths(line, listing) for line in lines
                        if not (len(line.split()) > 1 and line.split()[1] == "None")]
        if not self.samples:
            raise UsageError(f"{listing}: no line names a depth file; {LAYOUT}")

    def _paths(self, line: str, listing: Path) -> tuple[Path, Path]:
        fields = line.split()
        if len(fields) == 1:
            return (self._find(self.images, fields[0], IMAGE_SUFFIXES),
                    self._find(self.depths, fields[0], DEPTH_SUFFIXES))
        return self._listed(fields[0], listing), self._listed(fields[1], listing)

    def _find(self, folder: str, sample_id: str, suffixes: tuple[str, ...]) -> Path:
        for suffix in suffixes:
            path = self.root / folder / f"{sample_id}{suffix}"
            if path.is_file():
                return path
        raise UsageError(f"data.root: {self.root / folder / sample_id}{suffixes[0]} of id {sample_id!r} is missing "
                         f"(also looked for {', '.join(suffixes[1:])}); {LAYOUT}")

    def _listed(self, text: str, listing: Path) -> Path:
        path = Path(text)
        for candidate in (path, self.root / text.lstrip("/")) if path.is_absolute() else (self.root / text,):
            if candidate.is_file():
                return candidate
        raise UsageError(f"{listing}: {text} is listed but missing (looked under {self.root})")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw pair: uint8 RGB [H, W, 3] and float32 metres [H, W] (checked to be the same size)."""
        image_path, depth_path = self.samples[index]
        image = np.asarray(load_rgb(image_path))
        depth = read_depth_target(depth_path, self.depth)
        if depth.shape != image.shape[:2]:
            raise UsageError(f"depth {depth_path} is {depth.shape[1]}x{depth.shape[0]} but {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]} (width x height); they must be aligned")
        return image, depth

    def __getitem__(self, index: int):
        image, depth = self.load(index)
        return (image, depth) if self.transform is None else self.transform(image, depth)


class DepthTransform:
    """``(uint8 [H, W, 3], metres [H, W]) -> (image [3, h, w] normalised, metres)``; see the module docstring."""

    def __init__(self, size: tuple[int, int], training: bool, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        from torchvision.transforms import v2

        self.size, self.training = tuple(size), training
        if training:
            self.geometry = v2.Compose([v2.RandomResizedCrop(self.size, scale=tuple(scale), ratio=tuple(ratio),
                                                             antialias=True), v2.RandomHorizontalFlip(hflip)])
        else:
            self.geometry = v2.Resize(self.size, antialias=True)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray, depth: np.ndarray) -> tuple[Tensor, Tensor]:
        from torchvision import tv_tensors

        pixels = tv_tensors.Image(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        metres = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))
        if self.training:  # a Mask is resampled nearest-neighbour, the same draw as the image
            pixels, metres = self.geometry(pixels, tv_tensors.Mask(metres))
            metres = metres.as_subclass(Tensor)
        else:
            pixels = self.geometry(pixels)
        pixels = pixels.as_subclass(Tensor).float().div(255)
        return (pixels - self.mean) / self.std, metres


def collate_depth(samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """(images [B, 3, h, w], depths [B, H, W], sizes [B, 2] (each depth's own H, W)): every depth is
    zero-padded (no return) to the largest."""
    images = torch.stack([image for image, _ in samples])
    height = max(d.shape[0] for _, d in samples)
    width = max(d.shape[1] for _, d in samples)
    depths = torch.zeros(len(samples), height, width)
    for i, (_, d) in enumerate(samples):
        depths[i, :d.shape[0], :d.shape[1]] = d
    sizes = torch.tensor([list(d.shape) for _, d in samples], dtype=torch.long)
    return images, depths, sizes
