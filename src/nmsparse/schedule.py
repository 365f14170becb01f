"""Schedules: pure functions of the optimizer step. No hidden counters; time is passed in.

Each schedule is a small frozen dataclass with ``__call__(step) -> float``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class Schedule(Protocol):
    """Anything called with an optimizer step that returns a float."""

    def __call__(self, step: int) -> float: ...

__all__ = ["Schedule", "Constant", "Linear", "Cosine", "Exponential", "Cubic", "Power", "SineIn", "Geometric",
           "SaturatingExp", "StepDecay", "WarmupThen"]


@dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, step: int) -> float:
        return self.value


def _progress(step: int, start_step: int, end_step: int) -> float:
    if end_step <= start_step:
        return 1.0 if step >= end_step else 0.0
    return min(1.0, max(0.0, (step - start_step) / (end_step - start_step)))


@dataclass(frozen=True)
class _Ramp:
    """A move from ``start`` (until ``start_step``) to ``end`` (from ``end_step`` on)."""

    start: float
    end: float
    start_step: int
    end_step: int


@dataclass(frozen=True)
class Linear(_Ramp):
    """Linear from ``start`` at ``start_step`` to ``end`` at ``end_step``, constant outside."""

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * _progress(step, self.start_step, self.end_step)


@dataclass(frozen=True)
class Cosine(_Ramp):
    r"""Half cosine: :math:`v = end + (start - end)(1 + \cos(\pi p)) / 2`, p the progress in [0, 1]."""

    def __call__(self, step: int) -> float:
        p = _progress(step, self.start_step, self.end_step)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Exponential:
    r""":math:`v = start \cdot e^{-rate (step - start\_step)}` for step >= start_step (``start`` before)."""

    start: float
    rate: float
    start_step: int = 0

    def __call__(self, step: int) -> float:
        return self.start * math.exp(-self.rate * max(0, step - self.start_step))


@dataclass(frozen=True)
class Cubic(_Ramp):
    r"""Zhu & Gupta (2017) cubic ramp: :math:`v = end + (start - end)(1 - p)^3`."""

    def __call__(self, step: int) -> float:
        p = _progress(step, self.start_step, self.end_step)
        return self.end + (self.start - self.end) * (1.0 - p) ** 3


@dataclass(frozen=True)
class Power(_Ramp):
    r""":math:`v = start + (end - start) p^{k}` (``exponent`` k; 1 = linear, 3 = SUBP's cubic prune-rate ramp)."""

    exponent: float = 3.0

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * _progress(step, self.start_step, self.end_step) ** self.exponent


@dataclass(frozen=True)
class SineIn(_Ramp):
    r""":math:`v = start + (end - start)(1 - \cos(\pi p / 2))` (SUBP's ``cos`` prune-rate ramp)."""

    def __call__(self, step: int) -> float:
        p = _progress(step, self.start_step, self.end_step)
        if p >= 1.0:
            return self.end  # exactly (cos(pi / 2) is not exactly 0 in floating point)
        return self.start + (self.end - self.start) * (1.0 - math.cos(0.5 * math.pi * p))


@dataclass(frozen=True)
class Geometric(_Ramp):
    r""":math:`v = start (end / start)^{p}`: a constant ratio per step (an exponential anneal between two
    positive values, e.g. a Gumbel-softmax temperature)."""

    def __call__(self, step: int) -> float:
        return self.start * (self.end / self.start) ** _progress(step, self.start_step, self.end_step)


@dataclass(frozen=True)
class SaturatingExp(_Ramp):
    r"""A saturating exponential ramp (SUBP's ``exp`` prune-rate ramp):
    :math:`v = start + (end - start) \min(1, (1 - e^{-r t}) / (1 - e^{-r (T - u)}))` with t = step -
    start_step, T = end_step - start_step, ``rate`` r per step and ``unit`` u (SUBP reaches the end one
    update before ``end_step``)."""

    rate: float = 0.05
    unit: int = 1

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return self.start
        if step >= self.end_step:
            return self.end
        t, span = step - self.start_step, max(1, self.end_step - self.start_step - self.unit)
        frac = (1.0 - math.exp(-self.rate * t)) / (1.0 - math.exp(-self.rate * span))
        return self.start + (self.end - self.start) * min(1.0, frac)


@dataclass(frozen=True)
class StepDecay:
    """``start * gamma ** k`` where k counts the milestones <= step."""

    start: float
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, step: int) -> float:
        return self.start * self.gamma ** sum(step >= m for m in self.milestones)


@dataclass(frozen=True)
class WarmupThen:
    """Linear warm-up from ``start_factor * peak`` over ``warmup_steps``, then ``after(step)``."""

    after: Constant | Linear | Cosine | Exponential | Cubic | StepDecay
    warmup_steps: int
    start_factor: float = 0.01

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            peak = self.after(self.warmup_steps)
            frac = step / self.warmup_steps
            return peak * (self.start_factor + (1.0 - self.start_factor) * frac)
        return self.after(step)
