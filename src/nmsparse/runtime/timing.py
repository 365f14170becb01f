"""Timing of alternatives in one process: the harness of ``convert``'s layer choice and of ``nmsparse bench``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["time_interleaved", "summary"]


def time_interleaved(fns: list[Callable[[int], Any]], warmup: int, repeats: int, block: int = 5) -> list[list[float]]:
    """Times of ``repeats`` calls of each function, taken in blocks of ``block`` consecutive calls that
    alternate between the functions (a, b, then b, a, ...), so that drift in the machine's speed
    (other tenants, clocks) falls on all alike. Each block starts with one untimed call: the first
    call after a switch pays for the other function's cache state (measured +0.3 ms on a 1 ms
    batch-1 sparse 4096x4096 linear right after dense ones), which a model running its own layers
    back to back does not."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    times: list[list[float]] = [[] for _ in fns]
    calls = 0
    rounds = -(-repeats // block)
    for r in range(rounds):
        order = list(enumerate(fns)) if r % 2 == 0 else list(enumerate(fns))[::-1]
        for slot, fn in order:
            fn(calls)
            calls += 1
            for _ in range(min(block, repeats - r * block)):
                t0 = time.perf_counter()
                fn(calls)
                times[slot].append(time.perf_counter() - t0)
                calls += 1
    return times


def summary(times: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": 1e3 * statistics.median(times), "p10_ms": 1e3 * qs[0], "p90_ms": 1e3 * qs[-1]}
