"""Progress display for long work: a rich bar (rate and ETA) on a terminal, plain lines otherwise.

Output goes to stdout, or to the stream :func:`set_stream` names: the CLI's ``--json`` sends progress
to stderr (stdout then carries only the JSON document), throttled to one line every few seconds, and
a bar only where that stream is a terminal (no ANSI codes in a log).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["Progress", "set_stream", "format_clock"]

_STREAM: TextIO | None = None  # None: sys.stdout at the time of printing
_THROTTLE_S = 0.0


def set_stream(stream: TextIO | None, throttle_seconds: float = 0.0) -> None:
    """Send every later progress display to ``stream`` (None: stdout), plain lines at most one per
    ``throttle_seconds`` (the last line of a run always printed)."""
    global _STREAM, _THROTTLE_S
    _STREAM, _THROTTLE_S = stream, throttle_seconds


def format_clock(seconds: float) -> str:
    """``m:ss`` under an hour, else ``h:mm:ss``."""
    seconds = int(max(0, round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A rich progress bar (rate and ETA) on a terminal, plain periodic lines otherwise.

    Args:
        total: total steps of the run (0 when only a time budget bounds it).
        start: steps already done (resume).
        mode: ``auto``, ``bar``, ``lines`` or ``none``.
        every: lines mode prints every ``every`` steps.
        budget_seconds: a wall-clock budget: the display shows elapsed / budget and the time left
            (the run stops at the first step boundary past the budget: the whole steps still to
            start, at the current rate), and, with a step total too, whichever ends first.
    """

    def __init__(self, total: int, start: int, mode: str = "auto", every: int = 10, enabled: bool = True,
                 budget_seconds: float | None = None) -> None:
        self.total, self.done, self.every = total, start, max(1, every)
        self.start_done, self.t0 = start, time.perf_counter()
        self.budget = budget_seconds
        self.stream = _STREAM or sys.stdout
        self.throttle, self._last_print = _THROTTLE_S, -1e9
        if not enabled or mode == "none":
            self.mode = "none"
        elif mode == "auto":
            self.mode = "bar" if self.stream.isatty() else "lines"
        else:
            self.mode = mode
        self._bar = None
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            timed = self.budget is not None and not total
            columns = [TextColumn("{task.description}"), BarColumn()]
            columns += [TextColumn("{task.fields[clock]}")] if timed else [MofNCompleteColumn()]
            columns += [TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("left"),
                        TextColumn("{task.fields[left]}") if timed else TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}")]
            self._bar = RichProgress(*columns, console=Console(file=self.stream))
            self._bar.start()
            self._task = self._bar.add_task("run", total=int(self.budget) if timed else total,
                                            completed=0 if timed else start, rate="", info="", clock="", left="")

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def remaining(self) -> float:
        """Seconds left: by the step total at the current rate, by the budget (whole steps), or the
        smaller of the two."""
        rate, elapsed = self.rate(), time.perf_counter() - self.t0
        left = []
        if self.total and rate > 0:
            left.append((self.total - self.done) / rate)
        if self.budget is not None:
            # the run stops at the first step boundary past the budget: whole steps at the current rate
            over = self.budget - elapsed
            left.append(math.ceil(over * rate - 1e-9) / rate if rate > 0 and over > 0 else max(0.0, over))
        return min(left) if left else 0.0

    def line(self, info: str) -> str:
        """The plain-text progress line (what lines mode prints)."""
        rate, elapsed = self.rate(), time.perf_counter() - self.t0
        if self.budget is not None and not self.total:
            head = (f"step {self.done}  {format_clock(elapsed)} / {format_clock(self.budget)}  "
                    f"left {format_clock(self.remaining())}")
            return f"{head}  {rate:.2f} step/s  {info}"
        return f"step {self.done}/{self.total}  {info}  {rate:.2f} step/s  eta {_fmt_time(self.remaining())}"

    def update(self, step_done: int, info: str) -> None:
        self.done = step_done
        if self._bar is not None:
            rate, elapsed = self.rate(), time.perf_counter() - self.t0
            if self.budget is not None and not self.total:
                self._bar.update(self._task, completed=min(elapsed, self.budget), rate=f"{rate:.2f} step/s", info=info,
                                 clock=f"step {step_done}  {format_clock(elapsed)} / {format_clock(self.budget)}",
                                 left=format_clock(self.remaining()))
            else:
                self._bar.update(self._task, completed=step_done, rate=f"{rate:.2f} step/s", info=info)
            return
        if self.mode != "lines":
            return
        now = time.perf_counter()
        final = bool(self.total) and step_done == self.total
        if (step_done % self.every == 0 and now - self._last_print >= self.throttle) or final:
            self._last_print = now
            print(self.line(info), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "none":
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
