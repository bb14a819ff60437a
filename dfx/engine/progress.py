"""Progress display: rich bars on a terminal; otherwise plain periodic lines, written as records
of dfx's logger (see :mod:`dfx.log`) like every other message."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dfx.log import default_handler, logger


def _fmt(values: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())


class EpochProgress:
    """One bar (or a few lines) per epoch, showing step, it/s, ETA, loss and lr.

    ``enabled=False`` (non-zero ranks, ``--quiet``) shows nothing.
    """

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.tty = self.console.is_terminal and sys.stderr.isatty()
        self._bar = None

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.t0 = time.perf_counter()
        if not self.enabled or not self.tty:
            return
        self._bar = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=steps, epoch=f"{epoch}/{epochs}", rate="", info="")

    def step(self, step: int, values: dict | None = None) -> None:
        """Step ``step`` done; ``values`` (loss, lr, ...) at the log points, where a plain line is
        written when stderr is not a terminal."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = step / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            shown = {} if values is None else {"info": _fmt(values)}
            self._bar.update(self._task, completed=step, rate=f"{rate:.1f} it/s", **shown)
        elif values is not None:
            eta = (self.steps - step) / rate if rate > 0 else 0.0
            logger.info(f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} {_fmt(values)} "
                        f"{rate:.2f} it/s eta {eta:.0f}s")

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def log(self, message: str) -> None:
        """An info record, from the process that shows progress only."""
        if self.enabled:
            logger.info(message)


def track(items, total: int | None = None, description: str = "", enabled: bool = True,
          console: Console | None = None, every_s: float = 10.0):
    """Yield ``items`` with a progress bar on a terminal; otherwise a plain line every ``every_s``
    seconds and one at the end (logs stay short), as info records. ``enabled=False`` (``--quiet``,
    ``--json``, non-zero ranks) shows nothing. Everything goes to stderr.
    """
    if not enabled:
        yield from items
        return
    default_handler()
    console = console or Console(stderr=True)
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if console.is_terminal and sys.stderr.isatty():
        bar = Progress(TextColumn(f"[bold]{escape(description)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=True)
        with bar:
            yield from bar.track(items, total=total, description=description)
        return
    t0 = last = time.perf_counter()
    done = 0
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s and (total is None or done < total):
            last = now
            eta = f", eta {(total - done) * (now - t0) / done:.0f}s" if total else ""
            logger.info(f"{description} {done}/{total or '?'} ({now - t0:.0f}s{eta})")
    logger.info(f"{description}: {done} done in {time.perf_counter() - t0:.1f}s")
