"""Progress with an ETA for work that takes more than a few seconds: sampling for grids and FID, features, NLL.

:func:`progress` is the one way flowdiff shows it. Inside a training run with Lightning's rich progress bar the
work becomes one more line of that display (the same columns: done / total, elapsed and remaining time); in a
terminal outside training it is a rich bar of its own; where the output is a log file (SLURM, CI, a pipe) it is a
line every ``every_s`` seconds with the count and the estimated time left, so a long evaluation is never silent.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

Advance = Callable[[float], None]


def _live_bar(trainer) -> object | None:
    """The trainer's rich progress bar while it is displaying in a terminal (rank 0, enabled, started), else
    ``None`` (in a log file rich shows a bar only when it stops)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    live = getattr(bar, "progress", None)
    if bar is None or live is None or not getattr(bar, "is_enabled", False):
        return None
    if getattr(bar, "_progress_stopped", False) or not getattr(live, "live", None) or not live.live.is_started:
        return None
    return bar if live.console.is_terminal else None


def _clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=int(seconds)))


@contextlib.contextmanager
def progress(
    description: str, total: float, trainer=None, enabled: bool = True, every_s: float = 30.0, unit: str = ""
) -> Iterator[Advance]:
    """Yield ``advance(k)``, to be called as the work proceeds (``k`` units of ``total``); shows progress with ETA.

    ``trainer``: show it in the trainer's live rich progress bar when there is one. ``enabled=False`` (DDP ranks
    other than 0) shows nothing. In the trainer's bar the line goes when the block ends; a bar of its own, or the log,
    keeps the last state."""
    if not enabled or total <= 0:
        yield lambda k=1.0: None
        return
    bar = _live_bar(trainer)
    if bar is not None:
        live = bar.progress
        task = live.add_task(description, total=total)
        try:
            yield lambda k=1.0: (live.update(task, advance=k), bar.refresh())
        finally:
            live.remove_task(task)
            bar.refresh()
        return
    if sys.stdout.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn()) as own:
            task = own.add_task(description, total=total)
            yield lambda k=1.0: own.update(task, advance=k)
        return
    yield from _log_lines(description, total, every_s, unit)


class LogLines:
    """Progress for a log: a line when the work starts, one every ``every_s`` seconds with the count, the time spent
    and the estimated time left (and ``extra()``, e.g. the loss), and one when it ends. ``done``: the count it starts
    from (a resumed run); the time left comes from what this process did."""

    def __init__(
        self,
        description: str,
        total: float,
        every_s: float = 30.0,
        unit: str = "",
        extra: Callable[[], str] | None = None,
        done: float = 0.0,
    ) -> None:
        self.description, self.total, self.every_s, self.extra = description, total, every_s, extra
        self.suffix = f" {unit}" if unit else ""
        self.done = self.first = done
        self.start = self.printed = time.perf_counter()
        print(f"{description}: {done:.0f}/{total:g}{self.suffix} ...", flush=True)

    def advance(self, k: float = 1.0) -> None:
        self.update(self.done + k)

    def update(self, done: float) -> None:
        self.done = done
        now = time.perf_counter()
        if now - self.printed >= self.every_s and self.done < self.total:
            self.printed = now
            elapsed = now - self.start
            rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
            left = (self.total - self.done) / rate if rate > 0 else None
            extra = self.extra() if self.extra is not None else ""
            extra = f"; {extra}" if extra else ""
            print(
                f"{self.description}: {self.done:.0f}/{self.total:g}{self.suffix}, {_clock(elapsed)} elapsed, "
                f"about {_clock(left)} left{extra}",
                flush=True,
            )

    def close(self) -> None:
        elapsed = _clock(time.perf_counter() - self.start)
        print(f"{self.description}: {self.done:.0f}/{self.total:g}{self.suffix} in {elapsed}", flush=True)


def _log_lines(description: str, total: float, every_s: float, unit: str) -> Iterator[Advance]:
    lines = LogLines(description, total, every_s, unit)
    try:
        yield lines.advance
    finally:
        lines.close()
