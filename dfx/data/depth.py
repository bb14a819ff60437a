"""Depth images as sensors and datasets ship them, turned into metres and into a model input.

A 16-bit single-channel image is raw depth in one of :data:`DEPTH_ENCODINGS`:

- ``linear``: ``metres = value / scale`` (``scale`` units per metre: 1000 for millimetres, the
  Kinect / RealSense / Azure export convention; 5000 for the TUM RGB-D benchmark);
- ``sunrgbd``: SUN RGB-D's PNGs, whose 16 bits are rotated right by 3 (the toolbox's
  ``bitor(bitshift(d, -3), bitshift(d, 13))``), then millimetres;
- ``nyu-raw``: NYU Depth v2's raw Kinect frames (``.pgm``): byte-swapped disparity-like values
  ``d`` with ``metres = 351.3 / (1092.5 - d)`` clipped to [0, 10] (the toolbox's
  ``depth_rel2depth_abs``); 2047 marks no return.

Invalid pixels (zero, or 2047 in ``nyu-raw``) read as 0 m. For the model, depth becomes an image
on the 0-255 scale of 8-bit depth PNGs: ``255 * metres / max_metres`` (clipped), repeated to three
channels by the data pipeline. An 8-bit depth PNG is already on that scale and is read as it is;
HHA encodings are ordinary 3-channel images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Literal, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from dfx.errors import UsageError

DEPTH_ENCODINGS = ("linear", "sunrgbd", "nyu-raw")
COLOUR_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL's single-channel 16/32-bit modes
NYU_NO_RETURN = 2047


@dataclass(frozen=True)
class DepthFormat:
    """How raw depth is stored (``encoding``, ``scale`` units per metre) and the metres mapped to 255."""

    encoding: str = "linear"
    scale: float = 1000.0
    max_metres: float = 10.0

    def __post_init__(self):
        if self.encoding not in DEPTH_ENCODINGS:
            raise UsageError(f"data.depth_encoding: {self.encoding!r} is not one of {', '.join(DEPTH_ENCODINGS)}")
        if not self.scale > 0 or not self.max_metres > 0:
            raise UsageError(f"data.depth_scale / data.depth_max: expected positive numbers, got {self.scale} / "
                             f"{self.max_metres}")


@dataclass
class DepthDataSection:
    """The fields the depth, fusion and translation tasks' recipe ``data`` sections share (split
    files, ``image_size`` as an int or [height, width], the crop augmentation, ``mean`` / ``std``,
    the depth file format), what derives from them and how they are checked. Each section adds its
    folders and sets its own ``root``."""

    root: str = ""
    train_split: str = "train.txt"
    val_split: str = "val.txt"
    image_size: Union[int, list[int]] = 64
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    depth_encoding: Literal["linear", "sunrgbd", "nyu-raw"] = "linear"
    depth_scale: float = 1000.0  # raw units per metre (linear): 1000 millimetres, 5000 TUM RGB-D
    depth_max: float = 10.0  # metres mapped to 255 in 8-bit files

    @property
    def depth(self) -> DepthFormat:
        return DepthFormat(self.depth_encoding, self.depth_scale, self.depth_max)

    @property
    def size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    def check_size_and_depth(self, prefix: str) -> None:
        """Validate image_size, the depth fields and mean/std."""
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UsageError(f"{prefix}.mean/std: expected three values (every image is read as 3 channels)")
        size = [self.image_size] if isinstance(self.image_size, int) else self.image_size
        if len(size) not in (1, 2) or min(size) < 1:
            raise UsageError(f"{prefix}.image_size: expected a size or [height, width] in pixels, got {self.image_size}")
        if not self.depth_scale > 0 or not self.depth_max > 0:
            raise UsageError(f"{prefix}.depth_scale / depth_max: expected positive numbers (units per metre, "
                             f"metres), got {self.depth_scale} / {self.depth_max}")


def read_aligned(paths: list[Path], depth: DepthFormat = DepthFormat()) -> list[np.ndarray]:
    """The modality images of one sample (:func:`read_image_array` each); ValueError naming the
    sizes when they are not all the size of the first."""
    images = [read_image_array(p, depth) for p in paths]
    for image in images[1:]:
        if image.shape[:2] != images[0].shape[:2]:
            raise ValueError(f"{image.shape[1]}x{image.shape[0]} but {Path(paths[0]).name} is "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; modalities must be aligned")
    return images


def raw_to_metres(raw: np.ndarray, depth: DepthFormat) -> np.ndarray:
    """``[H, W]`` raw values (as PIL reads them) -> float32 metres, 0 where there is no depth."""
    if depth.encoding == "nyu-raw":
        values = raw.astype(np.uint16).byteswap().astype(np.float64)
        valid = values < NYU_NO_RETURN
        metres = np.where(valid, 351.3 / (1092.5 - np.where(valid, values, 0)), 0.0).clip(0.0, 10.0)
    elif depth.encoding == "sunrgbd":
        values = raw.astype(np.uint32)
        metres = (((values >> 3) | (values << 13)) & 0xFFFF) / 1000.0
    else:
        metres = raw.astype(np.float64) / depth.scale
    return metres.astype(np.float32)


def read_image_array(path: Path, depth: DepthFormat = DepthFormat()) -> np.ndarray:
    """One modality image as float32 ``[H, W, 3]`` on a 0-255 scale.

    Colour and 8-bit grey images (RGB, HHA, 8-bit depth, events, LiDAR) as they are, single-channel
    ones repeated three times; 16/32-bit single-channel images are raw depth (:func:`raw_to_metres`)
    mapped to ``255 * metres / depth.max_metres``. Any other mode is a :class:`UsageError`.
    """
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in DEPTH_MODES:
                metres = raw_to_metres(np.asarray(image), depth)
                array = (metres * (255.0 / depth.max_metres)).clip(0, 255)
            elif mode in COLOUR_MODES:
                array = np.asarray(image.convert("L" if mode in ("1", "L", "LA") else "RGB"), dtype=np.float32)
            else:
                raise UsageError(f"{path}: image mode {mode!r} is not understood; modality images must be colour or "
                                 f"8-bit grey ({', '.join(COLOUR_MODES)}) or 16/32-bit single-channel depth "
                                 f"({', '.join(DEPTH_MODES)}); convert the file")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"cannot read image {path}: {e}; remove or replace the file") from None
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array.astype(np.float32, copy=False)


def read_depth_metres(path: Path, depth: DepthFormat = DepthFormat()) -> np.ndarray:
    """A raw depth file as float32 metres ``[H, W]`` (0 = no depth); 8-bit files are refused."""
    with Image.open(path) as image:
        if image.mode not in DEPTH_MODES:
            raise UsageError(f"{path}: image mode {image.mode!r} holds no raw depth; expected a 16/32-bit "
                             f"single-channel image ({', '.join(DEPTH_MODES)})")
        return raw_to_metres(np.asarray(image), depth)


def read_depth_target(path: Path, depth: DepthFormat = DepthFormat()) -> np.ndarray:
    """A depth map as float32 metres ``[H, W]`` (0 = no depth), for training and scoring depth models.

    16/32-bit single-channel files are raw depth (:func:`raw_to_metres`); an 8-bit grey file is
    read on the 8-bit depth PNG scale, ``metres = value * depth.max_metres / 255``. Colour files are
    refused: they hold no depth.
    """
    try:
        with Image.open(path) as image:
            if image.mode in DEPTH_MODES:
                return raw_to_metres(np.asarray(image), depth)
            if image.mode == "L":
                return np.asarray(image, dtype=np.float32) * np.float32(depth.max_metres / 255.0)
            mode = image.mode
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"cannot read depth {path}: {e}; remove or replace the file") from None
    raise UsageError(f"{path}: image mode {mode!r} holds no depth; expected a 16/32-bit single-channel image "
                     f"({', '.join(DEPTH_MODES)}) or an 8-bit grey depth PNG")
