"""Image-to-image translation data: aligned input modalities and one target image.

Layout of a dataset root (the embedded ``shapes-translation`` is written the same way; a Taskonomy
sample tree exported to folders is too)::

    <root>/train.txt, val.txt       one sample per line: an id, or tab/space-separated relative paths
    <root>/<modality>/<id>.png      one folder per input modality (data.modalities: reshading, ...)
    <root>/<target>/<id>.png        the image to produce (data.target: rgb)

Images are read as dfx.data.multimodal reads modalities (8-bit grey repeated to 3 channels, 16-bit
depth decoded by ``data.depth_*``). A sample is ``(inputs [M, 3, H, W], target [3, H, W])``, every
image normalised by mean/std (0.5: values in [-1, 1], TokenFusion's normalisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfx.data.depth import DepthFormat, read_image_array
from dfx.data.multimodal import MultiModalFolder, aligned_geometry
from dfx.errors import UsageError


class TranslationFolder(MultiModalFolder):
    """The ``split`` of a translation root: ``(inputs, target)`` through ``transform``.

    ``modalities``: the input folders, in the order the model reads them; ``target``: the output
    folder. Missing folders and files are reported when the dataset is built, images of one id
    that differ in size when read.
    """

    def __init__(self, root: str | Path, split: str, modalities: list[str], target: str = "rgb",
                 split_file: str | None = None, transform=None, depth: DepthFormat = DepthFormat()):
        root = Path(root)
        if root.is_dir() and not (root / target).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise UsageError(f"data.target: {target!r} but {root / target}/ does not exist (folders in {root}: "
                             f"{', '.join(found) or 'none'}); expected <root>/<target>/<id>.png")
        if target in modalities:
            raise UsageError(f"data.target {target!r} is also listed in data.modalities {modalities}; the target "
                             "must not be an input")
        super().__init__(root, split, modalities, labels=target, split_file=split_file, classes=[target],
                         transform=transform, depth=depth)

    def _find(self, folder: str, sample_id: str, label: bool = False) -> Path:
        return super()._find(folder, sample_id, label=False)  # the target is an image, any suffix

    def load(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The raw sample: one float32 [H, W, 3] array (0-255) per input and the target's."""
        paths, target_path = self.samples[index]
        images = [read_image_array(path, self.depth) for path in (*paths, target_path)]
        for path, image in zip((*paths[1:], target_path), images[1:]):
            if image.shape[:2] != images[0].shape[:2]:
                raise UsageError(f"{path} is {image.shape[1]}x{image.shape[0]} but {paths[0]} is "
                                 f"{images[0].shape[1]}x{images[0].shape[0]} (width x height); the images of "
                                 "one sample must be aligned pixel for pixel")
        return images[:-1], images[-1]


class TranslationTransform:
    """``(M arrays [H, W, 3], target [H, W, 3], 0-255) -> (inputs [M, 3, h, w], target [3, h, w])``.

    Training: one random resized crop (area share ``scale``, aspect ``ratio``) to ``size`` and one
    horizontal flip with probability ``hflip``, the same draw for every image (bilinear). Evaluation:
    resize to ``size``. Then ``(x / 255 - mean) / std`` for every image.
    """

    def __init__(self, size: tuple[int, int], training: bool, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        self.geometry = aligned_geometry(size, training, scale, ratio, hflip)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: list[np.ndarray], target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        stacked = torch.from_numpy(np.stack([*images, target]).astype(np.float32, copy=False)).permute(0, 3, 1, 2)
        out = self.geometry(tv_tensors.Image(stacked.flatten(0, 1))).as_subclass(torch.Tensor)
        out = (out.unflatten(0, (len(images) + 1, 3)).div(255) - self.mean) / self.std
        return out[:-1].contiguous(), out[-1].contiguous()
