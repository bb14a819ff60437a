"""The dfx cache: embedded datasets written once, verified by checksum on every use.

Location: ``$DFX_HOME`` (default ``~/.cache/dfx``). A dataset is generated into a temporary
folder beside its final place and renamed into place when complete, so concurrent processes
(e.g. the ranks of a torchrun job) never see a half-written dataset and never corrupt each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from dfx.errors import RunError

MANIFEST = "dfx-manifest.json"


def dfx_home() -> Path:
    return Path(os.environ.get("DFX_HOME", "~/.cache/dfx")).expanduser()


def tree_checksum(root: Path) -> tuple[str, int]:
    """sha256 over every file's relative path and bytes (sorted), and the file count."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest(), len(files)


def verify(root: Path) -> bool:
    """True when ``root`` holds a complete dataset whose files match its manifest."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return tree_checksum(root) == (manifest.get("sha256"), manifest.get("files"))


def ensure_dataset(name: str, generate: Callable[[Path], dict], log=None) -> Path:
    """Path of cached dataset ``name``, generating it with ``generate(folder)`` when absent.

    ``generate`` writes the files into the folder it is given and returns metadata that is kept
    in the manifest. A cached copy that fails verification is regenerated.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = dfx_home() / "datasets" / name
    if root.is_dir():
        if verify(root):
            return root
        log(f"dfx: cached dataset {root} is incomplete or fails its checksum; regenerating it")
        shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"dfx: generating embedded dataset {name} into {root} (once)")
    try:
        meta = generate(tmp)
        sha, count = tree_checksum(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"name": name, "sha256": sha, "files": count, **meta}, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            if not verify(root):  # somebody else's copy won the rename; it must be a good one
                raise
    except OSError as e:
        raise RunError(f"cannot write dataset {name} into {root.parent}: {e}; set DFX_HOME to a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
