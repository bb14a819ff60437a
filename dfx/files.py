"""Writing files so that a reader sees the old version or the new one, never half of one; reading
the JSON files users hand in, with errors that name them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary file is removed if ``write`` fails; the parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | Path, label: str, fix: str = ""):
    """The parsed JSON of ``path``; a missing or invalid file is a UsageError naming ``label`` and the file."""
    from dfx.errors import UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{label} {path} does not exist{fix and '; ' + fix}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{label} {path} is not valid JSON ({e}){fix and '; ' + fix}") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically (the temporary name has no .png: say the format)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
