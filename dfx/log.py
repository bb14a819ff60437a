"""dfx's one logging channel: the standard ``logging`` logger ``dfx``, as plain lines on stderr.

Modules log to ``logging.getLogger(__name__)`` (children of ``dfx``): data summaries, the run
directory, progress lines when stderr is not a terminal (info), what the user should act on
(warning). The CLI calls :func:`log_to_stderr` once from ``--quiet`` / ``--debug``; stdout stays
free for results and ``--json``. Python callers can use :func:`quieted` or configure the logger
as usual (``logging.getLogger("dfx").setLevel(logging.WARNING)``).
"""

from __future__ import annotations

import contextlib
import logging
import sys

logger = logging.getLogger("dfx")


class _Stderr(logging.StreamHandler):
    """Plain lines on whatever ``sys.stderr`` is when a record comes (rich's live bars, pytest
    and typer's test runner swap it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns one; the current stderr is always used
        pass


def log_to_stderr(quiet: bool = False, debug: bool = False) -> None:
    """Write dfx's log records to stderr: info and up; only warnings and errors when ``quiet``;
    debug records too with ``debug``. Installs the handler once per process."""
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        logger.addHandler(_Stderr())
        logger.propagate = False  # an application's root handlers would print every line twice
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)


def default_handler() -> None:
    """Python callers (no CLI) get the stderr handler, at info level, on first use."""
    if not logger.handlers:
        log_to_stderr()


@contextlib.contextmanager
def quieted(quiet: bool):
    """Within the block, only warnings and errors when ``quiet``; the logger's level is restored
    after."""
    default_handler()
    previous = logger.level
    if quiet:
        logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(previous)
