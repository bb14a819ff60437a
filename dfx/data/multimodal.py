"""Multi-modal segmentation data: aligned images of several modalities and one label map.

Layout of a dataset root (the embedded ``shapes-rgbd`` is written the same way)::

    <root>/classes.txt              one class name a line (or list them in the recipe: data.classes)
    <root>/train.txt, val.txt       one sample per line: an id, or tab/space-separated relative paths
    <root>/<modality>/<id>.png      one folder per modality named in data.modalities (rgb, depth, ...)
    <root>/labels/<id>.png          uint8 class ids [H, W]; 255 = ignore (folder name: data.labels)

A split line with paths (``rgb/0001.png<TAB>depth/0001.png<TAB>masks/0001.png``, the list format
of the official NYUDv2 code) assigns each path to the modality (or label) folder it lies in.
The NYUDv2 layout of the official code is this one with modalities ``[rgb, depth]``, labels in
``masks/``, 40 classes and lists of 795 train / 654 test images (recipes/gemini-nyudv2-mitb3.yaml).

Every modality image becomes 3 channels on a 0-255 scale: RGB (and HHA) as is, a single-channel
8-bit image (depth, event, LiDAR) repeated three times; 16-bit single-channel images are raw depth,
decoded to metres by ``depth`` (dfx.data.depth: millimetres or another unit, SUN RGB-D's rotated
bits, NYU's raw Kinect frames) and mapped to 0-255. A sample is ``(images [M, 3, H, W] float
(normalised), label [H, W] int64)``: the first modality (RGB) normalised with mean/std, the others
only divided by 255, as GeminiFusion's reference does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dfx.data.depth import DepthFormat, read_image_array
from dfx.data.segmentation import IGNORE_INDEX, IMAGE_SUFFIXES, read_label, read_lines
from dfx.errors import UsageError

LAYOUT = ("expected <root>/<modality>/<id>.png for every modality, <root>/<labels>/<id>.png, "
          "<root>/{train,val}.txt (ids) and <root>/classes.txt (see docs/fuse.md)")


class MultiModalFolder(Dataset):
    """The ``split`` of a multi-modal segmentation root: ``(images, label)`` through ``transform``.

    ``modalities``: folder names, in the order the model reads them (the first is the primary
    stream). Missing folders and files are reported when the dataset is built; images of one id
    that differ in size, and label values outside [0, num_classes) other than 255, when read.
    """

    def __init__(self, root: str | Path, split: str, modalities: list[str], labels: str = "labels",
                 split_file: str | None = None, classes: list[str] | None = None, transform=None,
                 depth: DepthFormat = DepthFormat()):
        self.root = Path(root)
        self.depth = depth
        self.modalities = list(modalities)
        self.labels = labels
        self.transform = transform
        if not self.root.is_dir():
            raise UsageError(f"data.root: {self.root} does not exist; {LAYOUT}")
        for folder, what in [*((m, "data.modalities") for m in self.modalities), (labels, "data.labels")]:
            if not (self.root / folder).is_dir():
                found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                raise UsageError(f"{what}: {folder!r} is listed but {self.root / folder}/ does not exist "
                                 f"(folders in {self.root}: {', '.join(found) or 'none'}); {LAYOUT}")
        self.classes = list(classes) if classes else read_lines(self.root / "classes.txt", "class names, one a line")
        lines = read_lines(self.root / (split_file or f"{split}.txt"), f"samples of the {split} split, one a line")
        self.samples = [self._paths(line) for line in lines]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _paths(self, line: str) -> tuple[list[Path], Path]:
        """(one path per modality, label path) of one split line."""
        fields = line.split()
        if len(fields) == 1:
            sample_id = fields[0]
            return [self._find(m, sample_id) for m in self.modalities], self._find(self.labels, sample_id, label=True)
        by_folder = {Path(f).parts[0]: self.root / f for f in fields}
        paths = []
        for folder in (*self.modalities, self.labels):
            if folder not in by_folder:
                raise UsageError(f"{self.root}: split line {line!r} names no file in {folder}/ (a line is an id or "
                                 f"paths relative to the root, one per folder: {', '.join(self.modalities)}, "
                                 f"{self.labels})")
            if not by_folder[folder].is_file():
                raise UsageError(f"data.root: {by_folder[folder]} (listed in a split file) is missing")
            paths.append(by_folder[folder])
        return paths[:-1], paths[-1]

    def _find(self, folder: str, sample_id: str, label: bool = False) -> Path:
        for suffix in (".png",) if label else IMAGE_SUFFIXES:
            path = self.root / folder / f"{sample_id}{suffix}"
            if path.is_file():
                return path
        what = "label" if label else f"{folder} image"
        raise UsageError(f"data.root: {what} {self.root / folder / sample_id}.png of id {sample_id!r} is missing")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The raw sample: one float32 [H, W, 3] array (0-255) per modality and the checked uint8 label [H, W]."""
        paths, label_path = self.samples[index]
        images = [read_image_array(path, self.depth) for path in paths]
        for path, image in zip(paths[1:], images[1:]):
            if image.shape[:2] != images[0].shape[:2]:
                raise UsageError(f"{path} is {image.shape[1]}x{image.shape[0]} but {paths[0]} is "
                                 f"{images[0].shape[1]}x{images[0].shape[0]} (width x height); the modalities of "
                                 "one sample must be aligned pixel for pixel")
        label = read_label(label_path)
        if label.shape != images[0].shape[:2]:
            raise UsageError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but {paths[0]} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]} (width x height); they must match")
        bad = np.setdiff1d(np.unique(label), [*range(self.num_classes), IGNORE_INDEX])
        if bad.size:
            raise UsageError(f"label {label_path} holds values {bad[:8].tolist()}: class ids must be in "
                             f"[0, {self.num_classes}) ({self.num_classes} classes) or {IGNORE_INDEX} (ignore)")
        return images, label

    def __getitem__(self, index: int):
        images, label = self.load(index)
        if self.transform is None:
            return images, label
        return self.transform(images, label)


class MultiModalTransform:
    """``(M arrays [H, W, 3] on 0-255, label [H, W]) -> (images [M, 3, h, w] float, label [h, w] int64)``.

    Training: one random resized crop (area share ``scale``, aspect ``ratio``) to ``size`` (h, w)
    and one horizontal flip with probability ``hflip``, the same draw for every modality and the
    label (torchvision ``transforms.v2``: bilinear for images, nearest for the label). Evaluation:
    resize to ``size``. Then every modality is scaled to [0, 1]; ``normalize="first"`` (the
    reference's) normalises the first modality (RGB) by ``mean``/``std`` and leaves the others in
    [0, 1]; ``"all"`` normalises every modality.
    """

    def __init__(self, size: tuple[int, int], training: bool, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), normalize: str = "first"):
        self.geometry = aligned_geometry(size, training, scale, ratio, hflip)
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: list[np.ndarray], label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        stacked = torch.from_numpy(np.stack(images).astype(np.float32, copy=False)).permute(0, 3, 1, 2)
        # one Image tensor for all modalities: one geometry draw, applied to every channel alike
        image_out, label_out = self.geometry(tv_tensors.Image(stacked.flatten(0, 1)),
                                             tv_tensors.Mask(torch.from_numpy(label)))
        image_out = image_out.as_subclass(torch.Tensor).unflatten(0, (len(images), 3)).div(255)
        if self.normalize == "all":
            image_out = (image_out - self.mean) / self.std
        else:
            image_out = torch.cat([(image_out[:1] - self.mean) / self.std, image_out[1:]])
        return image_out, label_out.as_subclass(torch.Tensor).long()


def aligned_geometry(size, training: bool, scale, ratio, hflip: float):
    """The geometric augmentation every modality of a sample goes through together: a random
    resized crop and flip in training, a resize to ``size`` otherwise."""
    from torchvision.transforms import v2

    size = tuple(size)
    if training:
        return v2.Compose([v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
                           v2.RandomHorizontalFlip(hflip)])
    return v2.Resize(size, antialias=True)


NORMALIZE = ("first", "all")
