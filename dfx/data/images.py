"""Images as they come from cameras and labelling tools, turned into 8-bit RGB.

- EXIF orientation is applied (phones store portrait photos as rotated landscape pixels);
- greyscale, CMYK, palette and 16-bit images become RGB; 16-bit values are scaled to 8 bits
  (65535 -> 255) instead of being clipped to white;
- alpha is composited onto black (transparent pixels often hold arbitrary colours);
- a truncated or unreadable file is a :class:`UsageError` that names it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dfx.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".gif")
# EXIF orientations 5-8 rotate by 90 degrees: the displayed width is the stored height
_TRANSPOSED = {5, 6, 7, 8}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded PIL image of any mode."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PNG, PGM, TIFF): scale the full range to 8 bits
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(values * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(values * (255.0 if values.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB in its displayed orientation (PIL's OSError, ValueError... if unreadable).

    The one reader of dfx: training, evaluation, ``dfx predict`` and ``dfx export --image`` all
    see the same pixels for the same file.
    """
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def load_rgb(path: str | Path) -> Image.Image:
    """:func:`read_rgb`, with an unreadable file a :class:`UsageError` that names it."""
    try:
        return read_rgb(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        reason = "truncated file" if _truncated(e) else str(e)
        raise UsageError(f"cannot read image {path}: {reason}; remove or replace the file "
                         "(detection: or set data.skip_invalid: true)") from None


def _truncated(error: Exception) -> bool:
    """PIL's errors for a file that ends too early ("image file is truncated", "Truncated File Read")."""
    text = str(error).lower()
    return "is truncated" in text or "truncated file" in text


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), read from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read image {path}: {e}; remove or replace the file") from None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def image_problem(path: str | Path, decode: bool = True) -> str | None:
    """Why ``path`` cannot be used as an image ("missing", "truncated file", ...), or None.

    ``decode=False`` checks only the header and, for JPEG and PNG, that the file ends where the
    format ends (a cut-off download) - fast enough for every image of a large dataset.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as image:
            kind = image.format
            if decode:
                if kind == "JPEG":  # decode at 1/8 scale: as strict about truncation, 10x faster
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                return None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return "truncated file" if _truncated(e) else f"unreadable ({e})"
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read().rstrip(b"\x00")
    if kind == "JPEG" and not tail.endswith(b"\xff\xd9") or kind == "PNG" and b"IEND" not in tail:
        return "truncated file"
    return None


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
