"""Progress display for long work: a rich bar (rate and ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A rich progress bar (rate and ETA) on a terminal, plain periodic lines otherwise.

    Args:
        total: total optimizer steps of the run.
        start: steps already done (resume).
        mode: ``auto``, ``bar``, ``lines`` or ``none``.
        every: lines mode prints every ``every`` steps.
    """

    def __init__(self, total: int, start: int, mode: str = "auto", every: int = 10, enabled: bool = True) -> None:
        self.total, self.done, self.every = total, start, max(1, every)
        self.start_done, self.t0 = start, time.perf_counter()
        if not enabled or mode == "none":
            self.mode = "none"
        elif mode == "auto":
            self.mode = "bar" if sys.stdout.isatty() else "lines"
        else:
            self.mode = mode
        self._bar = None
        if self.mode == "bar":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, rate="", info="")

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def update(self, step_done: int, info: str) -> None:
        self.done = step_done
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=step_done, rate=f"{rate:.2f} step/s", info=info)
        elif self.mode == "lines" and (step_done % self.every == 0 or step_done == self.total):
            print(f"step {step_done}/{self.total}  {info}  {rate:.2f} step/s  eta {_fmt_time(eta)}", flush=True)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
