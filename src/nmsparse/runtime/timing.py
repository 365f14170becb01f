"""Timing of alternatives in one process: the harness of ``convert``'s layer choice and of ``nmsparse bench``."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["cold_copies", "rotating", "last_level_cache_bytes", "time_interleaved", "summary"]


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (from sysfs), or 32 MiB when it cannot be read."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * unit)
    return best or 32 * 1024**2


def cold_copies(module: nn.Module, nbytes: int, cache_bytes: int | None = None) -> list[nn.Module]:
    """``module`` and enough deep copies of it (each with its own weights) that cycling through them
    (:func:`rotating`) reads twice the last-level cache: each call finds its weights in memory while
    the code, the input and the interpreter's state stay in cache, as a layer of a model larger than
    the cache runs (every other layer's weights passed through the cache in between). Used by
    ``nmsparse bench``'s small-batch layer cases and ``convert``'s layer choice. (Reading 1.5x the
    cache of other data before each call evicted the code and state too: a small sparse layer of
    SmolLM2 then measured ~90 us against ~40 us inside the model, and 58 of its 210 1x16 layers
    stayed dense.) A packed layer's deepcopy keeps its weights in huge-page memory, as the model's
    layers keep theirs."""
    cache_bytes = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    count = max(1, math.ceil(2 * cache_bytes / max(1, nbytes)))
    return [module] + [copy.deepcopy(module) for _ in range(count - 1)]


def rotating(modules: list[nn.Module], x: Any) -> Callable[[int], Any]:
    """Call ``i`` runs ``modules[i % len(modules)](x)`` (the timed-function form of :func:`time_interleaved`)."""
    return lambda i, modules=modules, x=x: modules[i % len(modules)](x)


def time_interleaved(fns: list[Callable[[int], Any]], warmup: int, repeats: int, block: int = 5) -> list[list[float]]:
    """Times of ``repeats`` calls of each function, taken in blocks of ``block`` consecutive calls that
    alternate between the functions (a, b, then b, a, ...), so that drift in the machine's speed
    (other tenants, clocks) falls on all alike. Each block starts with one untimed call: the first
    call after a switch pays for the other function's cache state (measured +0.3 ms on a 1 ms
    batch-1 sparse 4096x4096 linear right after dense ones), which a model running its own layers
    back to back does not. Each function gets the index of the call (:func:`rotating` cycles
    :func:`cold_copies` by it)."""
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
