"""The dfx cache: embedded datasets written once, verified by checksum on every use.

Location: ``$DFX_HOME`` (default ``~/.cache/dfx``). A dataset is generated into a temporary
folder beside its final place and renamed into place when complete, so concurrent processes
(e.g. the ranks of a torchrun job) never see a half-written dataset and never corrupt each other.
Checking and regenerating happen under a per-dataset lock (``datasets/.<name>.lock``): a process
never deletes a copy that another is still verifying, and only one of them regenerates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import logging
from pathlib import Path
from typing import Callable

from dfx.errors import RunError
from dfx.files import FileLock

logger = logging.getLogger(__name__)

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
        return tree_checksum(root) == (manifest.get("sha256"), manifest.get("files"))
    except (OSError, ValueError):  # unreadable, or files vanishing under us
        return False


def ensure_dataset(name: str, generate: Callable[[Path], dict], log=None) -> Path:
    """Path of cached dataset ``name``, generating it with ``generate(folder)`` when absent.

    ``generate`` writes the files into the folder it is given and returns metadata that is kept
    in the manifest. A cached copy that fails verification is regenerated.
    """
    log = log or logger.info
    root = dfx_home() / "datasets" / name
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(name, root, e) from None
    lock = FileLock(root.parent / f".{name}.lock")
    try:
        lock.acquire()
    except RunError:  # a read-only cache: usable as it is, nobody can change it
        pass
    try:
        if root.is_dir():
            if verify(root):
                return root
            log(f"dfx: cached dataset {root} is incomplete or fails its checksum; regenerating it")
            stale = root.parent / f".{name}.stale-{os.getpid()}"
            try:
                os.rename(root, stale)  # out of the way at once; deleted below
            except OSError as e:
                raise _unwritable(name, root, e) from None
            shutil.rmtree(stale, ignore_errors=True)
        return _generate(name, root, generate, log)
    finally:
        lock.release()


def _unwritable(name: str, root: Path, error: OSError) -> RunError:
    return RunError(f"cannot write dataset {name} into {root.parent}: {error.strerror or error}; "
                    "set DFX_HOME to a writable folder")


def _generate(name: str, root: Path, generate: Callable[[Path], dict], log) -> Path:
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
        raise _unwritable(name, root, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
