r"""``progressive``: progressive gradient flow for N:M sparsity (Bambhaniya et al., "Progressive
Gradient Flow for Robust N:M Sparsity Training in Transformers", arXiv 2402.04744).

A run has three phases, in optimizer steps of a run of T steps:

* dense warm-up ``[0, D)`` with ``D = floor(dense_fraction * T)``: the forward is dense (d = 1);
* the sparse phase ``[D, F)`` with ``F = T - floor(finetune_fraction * T)``;
* a fine-tune phase ``[F, T)`` with a hard mask (d = 0), fixed by default.

In the sparse phase two mechanisms, usable together, limit the gradient flow to pruned weights
progressively:

* **Decaying masks (MDGF).** The forward is :math:`W \odot (M + (1 - M)\,d(t))`, t counted in
  optimizer steps from the start of the sparse phase (not from step 0: the reference code's
  offset was 100x too small), with ``decay``: ``step`` d = 0, ``linear`` d = max(0, 1 - c t),
  ``exp`` d = exp(-c t); c is ``decay_rate``. Backward is straight-through (plus the SR-STE decay on
  pruned weights when ``pruned_decay`` > 0, which also gives the SR-STE baseline in this recipe).
* **Pattern stages (SDGF).** The sparse phase is cut into k equal frames; frame i starts at
  ``D + floor(i (F - D) / k)`` and uses the i-th pattern of the layer's stage list: ``stepwise``
  (m-1):m, then n halved from m/2 down to the target, e.g. 1:8 -> 7:8, 4:8, 2:8, 1:8;
  ``geometric`` (n 2^j):(m 2^j) for j = k-1..0 at constant density, e.g. 1:8 -> 8:64, 4:32, 2:16, 1:8;
  ``densify`` n:(m 2^j), e.g. 1:8 -> 1:64, 1:32, 1:16, 1:8; or an explicit list.

Every layer (and every q/k/v slice of a fused projection) derives its stages from its *own* target
pattern, so per-slice patterns never leak between layers. The schedule is a pure function of the
step and the run length, which the state_dict records; a resumed run continues in the same stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..pattern import NMPattern, PatternError, parse_pattern
from ..schedule import Exponential, Linear, Schedule, StepDecay
from .base import Layers, Method, MethodError, Plan, register_method

__all__ = ["ProgressiveOptions", "Progressive", "pattern_stages", "phase_bounds", "frame_starts", "decay_schedule"]


def pattern_stages(target: NMPattern, kind: str, count: int = 4) -> list[NMPattern]:
    """The pattern list of an SDGF schedule ending at ``target``.

    Args:
        target: the final n:m pattern.
        kind: ``stepwise``, ``geometric``, ``densify`` or ``none`` (just the target).
        count: number of stages of ``geometric`` and ``densify``.
    """
    n, m, axis, pad = target.n, target.m, target.axis, target.pad
    if kind == "none" or target.is_dense:
        return [target]
    if kind == "stepwise":
        ns = [m - 1]
        half = m // 2
        while half > n:
            if half < ns[-1]:
                ns.append(half)
            half //= 2
        if ns[-1] != n:
            ns.append(n)
        return [NMPattern(k, m, axis, pad) for k in ns]
    if kind == "geometric":
        return [NMPattern(n * 2**j, m * 2**j, axis, pad) for j in range(count - 1, -1, -1)]
    if kind == "densify":
        return [NMPattern(n, m * 2**j, axis, pad) for j in range(count - 1, -1, -1)]
    raise MethodError(f"unknown stage kind {kind!r}; expected none, stepwise, geometric, densify or explicit")


def phase_bounds(total_steps: int, dense_fraction: float, finetune_fraction: float) -> tuple[int, int]:
    """``(sparse_start, finetune_start)`` in optimizer steps."""
    return math.floor(dense_fraction * total_steps), total_steps - math.floor(finetune_fraction * total_steps)


def frame_starts(sparse_start: int, finetune_start: int, frames: int) -> list[int]:
    """First step of each of ``frames`` equal frames of the sparse phase."""
    length = finetune_start - sparse_start
    return [sparse_start + math.floor(i * length / frames) for i in range(frames)]


def decay_schedule(kind: str, rate: float, sparse_start: int) -> Schedule:
    """d(step) of MDGF: 1 in the dense phase (before ``sparse_start``), then ``step`` (0 at once),
    ``linear`` (max(0, 1 - rate t)) or ``exp`` (exp(-rate t)), t the steps since ``sparse_start``."""
    if kind == "step":
        return StepDecay(1.0, (sparse_start,), 0.0)
    if kind == "linear":
        return Linear(1.0, 0.0, sparse_start, sparse_start + 1.0 / rate)  # type: ignore[arg-type]
    if kind == "exp":
        return Exponential(1.0, rate, sparse_start)
    raise MethodError(f"unknown decay {kind!r}; expected step, linear or exp")


@dataclass
class ProgressiveOptions:
    decay: Literal["step", "linear", "exp"] = field(
        default="exp", metadata={"help": "MDGF dense factor of pruned weights: step (hard), linear, exp"})
    decay_rate: float = field(default=2e-4, metadata={"help": "c of d = max(0, 1 - c t) or exp(-c t), per step"})
    stages: Literal["none", "stepwise", "geometric", "densify", "explicit"] = field(
        default="none", metadata={"help": "SDGF pattern stages over the sparse phase"})
    stage_count: int = field(default=4, metadata={"help": "stages of geometric / densify"})
    stage_patterns: tuple[str, ...] = field(
        default=(), metadata={"help": "explicit stages, e.g. ['7:8', '4:8', '2:8', '1:8'] (stages: explicit)"})
    dense_fraction: float = field(default=0.0, metadata={"help": "fraction of the run trained dense first"})
    finetune_fraction: float = field(default=0.0, metadata={"help": "fraction of the run fine-tuned with a hard mask"})
    finetune_masks: Literal["fixed", "dynamic"] = field(
        default="fixed", metadata={"help": "fine-tune phase: masks frozen, or still recomputed every update"})
    update_every_steps: int = field(default=1, metadata={"help": "recompute masks every k steps in the sparse phase"})
    pruned_decay: float = field(
        default=0.0, metadata={"help": "SR-STE lambda on pruned weights in backward (0 = plain STE)"})

    def __post_init__(self) -> None:
        if self.decay_rate < 0:
            raise ValueError(f"decay_rate must be >= 0, got {self.decay_rate}")
        if not (0.0 <= self.dense_fraction < 1.0 and 0.0 <= self.finetune_fraction < 1.0):
            raise ValueError("dense_fraction and finetune_fraction must be in [0, 1)")
        if self.dense_fraction + self.finetune_fraction >= 1.0:
            raise ValueError(
                f"dense_fraction + finetune_fraction = {self.dense_fraction + self.finetune_fraction} leaves no "
                "sparse phase; their sum must be < 1")
        if self.stage_count < 1:
            raise ValueError(f"stage_count must be >= 1, got {self.stage_count}")
        if self.update_every_steps < 1:
            raise ValueError(f"update_every_steps must be >= 1, got {self.update_every_steps}")
        if self.pruned_decay < 0:
            raise ValueError(f"pruned_decay must be >= 0, got {self.pruned_decay}")
        if (self.stages == "explicit") != bool(self.stage_patterns):
            raise ValueError("give stage_patterns exactly when stages is 'explicit'")
        for text in self.stage_patterns:
            if not isinstance(parse_pattern(text), NMPattern):
                raise ValueError(f"stage pattern {text!r} is not an n:m pattern")


@register_method("progressive")
class Progressive(Method):
    Options = ProgressiveOptions

    def __init__(self, options: ProgressiveOptions | None = None) -> None:
        super().__init__(options)
        self.grad_rule = "srste" if self.options.pruned_decay > 0 else "ste"
        self.targets: dict[str, tuple[NMPattern, ...]] = {}
        self.stage_lists: dict[str, list[list[NMPattern]]] = {}

    @property
    def decay(self) -> float:
        return self.options.pruned_decay

    # ------------------------------------------------------------------------------- schedule
    def _needs_horizon(self) -> bool:
        o = self.options
        return o.dense_fraction > 0 or o.finetune_fraction > 0 or o.stages != "none"

    def bounds(self) -> tuple[int, float]:
        """``(sparse_start, finetune_start)``; without a horizon the sparse phase never ends."""
        if self.total_steps is None:
            if self._needs_horizon():
                raise MethodError(
                    "progressive needs the run length for its phases and stages: pass total_steps to "
                    "Sparsifier.prepare() or call Sparsifier.set_horizon(total_steps)")
            return 0, math.inf
        return phase_bounds(self.total_steps, self.options.dense_fraction, self.options.finetune_fraction)

    def _in_finetune(self, step: int) -> bool:
        return self.options.finetune_fraction > 0 and step >= self.bounds()[1]

    def _stages_for(self, fqn: str, target: NMPattern) -> list[NMPattern]:
        o = self.options
        if o.stages == "explicit":
            stages = [parse_pattern(p, axis=target.axis) for p in o.stage_patterns]
            if stages[-1] != target:
                raise MethodError(
                    f"{fqn}: explicit stages end at {stages[-1]} but the layer's target is {target}; end the "
                    "list at the target, or use a generated kind (stepwise, geometric, densify)")
            return stages  # type: ignore[return-value]
        return pattern_stages(target, o.stages, o.stage_count)

    def patterns_at(self, fqn: str, step: int) -> tuple[NMPattern, ...]:
        """The layer's patterns (one per row slice) in the forward of ``step``."""
        sparse_start, finetune_start = self.bounds()
        out = []
        for stages in self.stage_lists[fqn]:
            if self._in_finetune(step):
                out.append(stages[-1])
                continue
            starts = frame_starts(sparse_start, int(finetune_start), len(stages)) if len(stages) > 1 else [sparse_start]
            index = max(0, sum(1 for s in starts if s <= step) - 1)
            out.append(stages[index])
        return tuple(out)

    def dense_factor(self, step: int) -> float:
        sparse_start, _ = self.bounds()
        if self._in_finetune(step):
            return 0.0
        return decay_schedule(self.options.decay, self.options.decay_rate, sparse_start)(step)

    def masks_due(self, step: int) -> bool:
        sparse_start, finetune_start = self.bounds()
        nxt = step + 1
        if nxt < sparse_start:
            return False
        if self._in_finetune(nxt) and self.options.finetune_masks == "fixed":
            return False
        return (nxt - sparse_start) % self.options.update_every_steps == 0

    # ---------------------------------------------------------------------------------- hooks
    def prepare(self, layers: Layers, model) -> None:
        for fqn, layer in layers.items():
            for p in layer.patterns:
                if not isinstance(p, NMPattern):
                    raise MethodError(f"progressive works with n:m patterns; {fqn} has {p}")
            self.targets[fqn] = layer.patterns  # type: ignore[assignment]
            lists = [self._stages_for(fqn, p) for p in layer.patterns]  # type: ignore[arg-type]
            rows = layer.module.weight.shape[0] // len(layer.patterns)
            shape = (rows,) + tuple(layer.module.weight.shape[1:])
            for stages in lists:
                for stage in stages:
                    try:
                        stage.check_shape(shape)
                    except PatternError as exc:
                        raise MethodError(f"{fqn}: stage pattern {stage} does not fit: {exc}") from None
            self.stage_lists[fqn] = lists

    def advance(self, step: int, layers: Layers) -> Plan:
        sparse_start, finetune_start = self.bounds()
        patterns = {fqn: self.patterns_at(fqn, step) for fqn in layers}
        if self._in_finetune(step) and self.options.finetune_masks == "fixed":
            rule = ("masked", 0.0)  # hard, fixed mask: pruned weights get no gradient
        else:
            rule = (self.grad_rule, self.options.pruned_decay)
        # masks are (re)computed from the current weights when sparsity begins and when it freezes
        refresh = step == sparse_start or (self._in_finetune(step) and step == finetune_start)
        return Plan(patterns, rule, refresh)

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("total_steps")
        if saved is not None and self.total_steps is not None and saved != self.total_steps:
            raise MethodError(
                f"the checkpoint's progressive schedule spans {saved} steps but this run has {self.total_steps}; "
                "resume with the same epochs and batch size")
        if self.total_steps is None and saved is not None:
            self.total_steps = saved

    def summary(self) -> dict:
        if self.total_steps is None:
            return {}
        sparse_start, finetune_start = self.bounds()
        return {"sparse_start_step": sparse_start, "finetune_start_step": finetune_start,
                "stages": {fqn: [[str(p) for p in s] for s in lists] for fqn, lists in self.stage_lists.items()}}
