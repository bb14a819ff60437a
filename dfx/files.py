"""Writing files so that a reader sees the old version or the new one, never half of one; reading
the JSON files users hand in, with errors that name them.

Every file dfx writes goes through :func:`atomic_write`: written to a temporary name beside the
target, flushed to disk, given the usual permissions (umask, like any other file of the run)
and renamed into place. A failed write (full disk, read-only folder) is a :class:`RunError`
naming the file and the cause; the previous version of the file is left untouched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from dfx.errors import RunError

TMP_MARK = ".tmp-"  # temporary names are ".<name>.tmp-<pid>"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: Path, error: BaseException) -> RunError:
    """A one-line RunError for a failed write of ``path``, saying why (disk full, read-only, ...)."""
    code = getattr(error, "errno", None)
    text = str(error).lower()
    if code == errno.ENOSPC or "no space left" in text or "failed writing" in text and _nearly_full(path):
        cause = "no space left on the device; free some space or write the run elsewhere (--out)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or "read-only" in text or "permission denied" in text:
        cause = "the folder is read-only or not yours; make it writable or write the run elsewhere (--out)"
    else:
        cause = (os.strerror(code) if code else (str(error).strip().splitlines() or [type(error).__name__])[0])
    return RunError(f"cannot write {path}: {cause}")


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary file is removed if ``write`` fails; the parent folder is created if needed.
    Library write errors (OSError, and the RuntimeError/SafetensorError that torch and
    safetensors raise for a full disk) become a RunError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; a run's files share one mode
        _fsync(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            raise write_error(path, e) from None
        raise
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


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left in ``folder`` by a killed writer (call only while holding the
    folder's lock, when no other writer can be running); returns what was removed."""
    pattern = re.compile(r"^\..+" + re.escape(TMP_MARK) + r"\d+$")
    removed = []
    for item in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if item.is_file() and pattern.match(item.name):
            item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write a probe file in it, so an unwritable run directory
    fails at start rather than after an epoch of training."""
    folder = Path(folder)
    probe = folder / f".write-probe{TMP_MARK}{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"dfx")
        probe.unlink()
    except OSError as e:
        raise write_error(folder, e) from None


class FileLock:
    """An exclusive OS lock (``fcntl.flock``) on ``path``, created if needed.

    The kernel releases it when the holder exits or is killed (even by kill -9), so a lock left
    by a dead process is taken over without anyone deleting it. The file records the holder's
    pid for the message a second process gets. ``acquire(wait=False)`` returns False when
    another process holds it. Without ``fcntl`` (not POSIX) locking is a no-op.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, wait: bool = True) -> bool:
        try:
            import fcntl
        except ImportError:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return True

    def holder(self) -> str:
        """The pid written by the process holding the lock (best effort)."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (removing it would race)
            self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
