"""Errors that reach the user as one line and an exit code.

`UsageError` (exit 2): the input is wrong — a recipe key, a value, a missing file.
`RunError` (exit 1): the input was fine but the run failed — no network, a corrupt checkpoint.
Anything else that escapes is a bug; the CLI reports it as exit 1 and shows the traceback with --debug.

In a multi-process run each message names its rank; under ``dfx train --nproc-per-node N`` a failing
rank records its error for the launcher, which reports the first one (the cause) with its exit code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class DfxError(Exception):
    """Base class: the message is complete and meant for the user."""

    exit_code = 1


class UsageError(DfxError):
    """Bad usage, recipe, key, type or path. Exit code 2."""

    exit_code = 2


class RunError(DfxError):
    """A run that could not complete. Exit code 1."""

    exit_code = 1


# Set by `launch` for its ranks: the folder where a failing rank leaves its error for the launcher.
ERROR_DIR = "DFX_ERROR_DIR"


def rank_label() -> str:
    """``"rank N: "`` in a multi-process run (prefixes error messages), else empty."""
    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def record_failure(message: str, exit_code: int) -> bool:
    """Under ``dfx train --nproc-per-node``, leave this rank's error for the launcher (True); else False."""
    folder = os.environ.get(ERROR_DIR)
    if not folder:
        return False
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "error": message, "exit_code": exit_code, "time": time.time()}
    path = Path(folder) / f"rank-{rank}.json"
    tmp = path.with_name(f".{path.name}.tmp")  # errors.py is a leaf: no dfx.files here, same rename
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return True


def first_failure(folder: str | Path) -> dict | None:
    """The earliest error any rank recorded: the cause (later ones are other ranks losing it)."""
    records = []
    for path in Path(folder).glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(records, key=lambda r: r["time"]) if records else None
