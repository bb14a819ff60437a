"""Errors that reach the user as one line and an exit code.

`UsageError` (exit 2): the input is wrong — a recipe key, a value, a missing file.
`RunError` (exit 1): the input was fine but the run failed — no network, a corrupt checkpoint.
Anything else that escapes is a bug; the CLI reports it as exit 1 and shows the traceback with --debug.

In a multi-process run each message names its rank; under ``dfx train --nproc-per-node N`` a failing
rank records its error for the launcher, which reports the first one (the cause) with its exit code.
"""

from __future__ import annotations

import os


class DfxError(Exception):
    """Base class: the message is complete and meant for the user."""

    exit_code = 1


class UsageError(DfxError):
    """Bad usage, recipe, key, type or path. Exit code 2."""

    exit_code = 2


class RunError(DfxError):
    """A run that could not complete. Exit code 1."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers such as SLURM send before killing a job), raised like Ctrl-C."""


_terminated = [False]  # a SIGTERM arrived (set by the CLI's handler)


def note_sigterm() -> None:
    _terminated[0] = True


def reset_sigterm() -> None:
    _terminated[0] = False


def sigterm_received() -> bool:
    return _terminated[0]


def stop_if_terminated() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived. The handler raises it where the signal lands,
    which can be code that swallows it (a ``__del__``, a finaliser) or wraps it in another error;
    the training loop checks here between steps so that the run still stops."""
    if _terminated[0]:
        raise Terminated


def rank_label() -> str:
    """``"rank N: "`` in a multi-process run (prefixes error messages), else empty."""
    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
