"""Errors that reach the user as one line and an exit code.

`UsageError` (exit 2): the input is wrong — a recipe key, a value, a missing file.
`RunError` (exit 1): the input was fine but the run failed — no network, a corrupt checkpoint.
Anything else that escapes is a bug; the CLI reports it as exit 1 and shows the traceback with --debug.
"""

from __future__ import annotations


class DfxError(Exception):
    """Base class: the message is complete and meant for the user."""

    exit_code = 1


class UsageError(DfxError):
    """Bad usage, recipe, key, type or path. Exit code 2."""

    exit_code = 2


class RunError(DfxError):
    """A run that could not complete. Exit code 1."""

    exit_code = 1
