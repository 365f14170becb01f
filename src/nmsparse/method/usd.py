r"""``usd``: unstructured, then structured dynamic N:M under a global budget (USD, built on
DominoSearch, Sun et al., NeurIPS 2021).

Each selected layer starts at its selected pattern (normally dense, ``m:m``) and lowers its own n
until the model's sparsity over the selected layers reaches ``target_sparsity`` (by parameters or by
FLOPs). Phases, in optimizer steps:

1. **Unstructured** (optional, ``unstructured_steps`` > 0): gradual magnitude pruning (Zhu & Gupta's
   cubic ramp) of each layer toward its ERK density for ``unstructured_fraction * target_sparsity``;
   pruned weights are set to zero and get no gradient, so the structured search starts from weights
   whose magnitudes already say what can go.
2. **Structured search.** Every ``check_every_steps`` steps, per layer: the per-group threshold
   :math:`T_g` is the mean of the m/2 smallest magnitudes of group g (refreshed while the layer is
   still at its starting n, frozen after its first decrement); when at least ``vote_ratio`` of the
   groups hold fewer than :math:`n_{live}` weights above their threshold, :math:`n_{live}` drops by
   one. The forward keeps the top :math:`n_{live}` of every group and pruned weights get no
   gradient; the *scheme* n of a layer is the last candidate (powers of two by default) its
   :math:`n_{live}` reached. Every ``penalty_every_steps`` steps a penalty
   :math:`\tfrac12 \lambda \sum_l f_l \lVert M_l \odot W_l \rVert^2` pulls surviving weights down,
   with :math:`f_l` = ``penalty_erk_weight`` x (the layer's remaining ERK sparsity budget,
   normalised) + ``penalty_flops_weight`` x (its share of the remaining FLOPs, normalised); λ doubles
   at each of ``penalty_doubling_steps``. The search stops when the scheme reaches the target.
3. **Fine-tune** the fixed scheme with SR-STE (``finetune_decay``). With ``finetune_steps`` > 0 the
   search must end ``finetune_steps`` before the run does; if the target is not reached by then,
   the remaining reduction is forced (the layer with the strongest penalty factor steps down one
   candidate at a time) and the summary says so.

The scheme ``{fqn: "n:m"}`` is in :meth:`summary` (the trainer writes it as ``scheme.json``) and
loads back as a fixed allocation. Unlike the reference code this runs on the CPU, has no debug
output in the forward, counts survivors without the always-false "growth" test, and a penalty of 0
does not crash the scheme update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..allocate import erk_densities, power_of_two_candidates
from ..grad import SRSTE_DEFAULT_DECAY
from ..mask import to_groups
from ..pattern import NMPattern
from ..schedule import Cubic
from .base import Layers, LayerState, Method, MethodError, Plan, register_method

__all__ = ["UsdOptions", "Usd", "domino_thresholds", "votes_to_lower", "penalty_factors"]


def domino_thresholds(groups_abs: torch.Tensor) -> torch.Tensor:
    """Per-group threshold: the mean of the m/2 smallest magnitudes of each ``[G, m]`` group."""
    m = groups_abs.shape[1]
    smallest = torch.topk(groups_abs, max(1, m // 2), dim=1, largest=False).values
    return smallest.mean(dim=1)


def votes_to_lower(groups_abs: torch.Tensor, thresholds: torch.Tensor, n_live: int, vote_ratio: float) -> bool:
    """True when at least ``vote_ratio`` of the groups hold fewer than ``n_live`` weights above threshold."""
    survivors = (groups_abs > thresholds[:, None]).sum(dim=1)
    return bool((survivors < n_live).float().mean() >= vote_ratio)


def penalty_factors(
    erk_sparsity: dict[str, float], densities: dict[str, float], flops: dict[str, float],
    erk_weight: float, flops_weight: float,
) -> dict[str, float]:
    """Per-layer penalty strength: a mix of remaining ERK budget and remaining FLOPs share, each in [0, 1].

    Args:
        erk_sparsity: the layer's ERK target sparsity.
        densities: the layer's current scheme density n/m.
        flops: the layer's dense multiply-accumulates per sample (any positive scale).
    """
    remaining = {f: max(0.0, erk_sparsity[f] - (1.0 - densities[f])) for f in densities}
    top = max(remaining.values(), default=0.0)
    erk_norm = {f: (r / top if top >= 0.01 else 0.0) for f, r in remaining.items()}
    live = {f: flops[f] * densities[f] for f in densities}
    top_flops = max(live.values(), default=0.0)
    flops_norm = {f: (v / top_flops if top_flops > 0 else 0.0) for f, v in live.items()}
    return {f: erk_weight * erk_norm[f] + flops_weight * flops_norm[f] for f in densities}


@dataclass
class UsdOptions:
    target_sparsity: float = field(default=0.75, metadata={"help": "global sparsity to reach over the selected layers"})
    budget: Literal["params", "flops"] = field(default="params", metadata={"help": "what the target counts"})
    candidates: tuple[int, ...] = field(
        default=(), metadata={"help": "allowed scheme n (empty = powers of two up to m)"}
    )
    check_every_steps: int = field(default=100, metadata={"help": "steps between n-lowering votes"})
    vote_ratio: float = field(default=0.75, metadata={"help": "fraction of groups that must vote to lower n"})
    penalty_strength: float = field(default=0.1, metadata={"help": "lambda of the survivor penalty (0 = off)"})
    penalty_every_steps: int = field(default=5, metadata={"help": "apply the penalty on every k-th step"})
    penalty_doubling_steps: tuple[int, ...] = field(default=(), metadata={"help": "steps at which lambda doubles"})
    penalty_erk_weight: float = field(default=0.5, metadata={"help": "share of the remaining-ERK-budget term"})
    penalty_flops_weight: float = field(default=0.5, metadata={"help": "share of the FLOPs term"})
    erk_power_scale: float = field(default=1.0, metadata={"help": "exponent of the ERK budget"})
    unstructured_steps: int = field(default=0, metadata={"help": "length of the unstructured phase (0 = skip)"})
    unstructured_fraction: float = field(
        default=0.5, metadata={"help": "the unstructured phase reaches this fraction of the target sparsity"})
    finetune_steps: int = field(
        default=0, metadata={"help": "steps reserved at the end for fine-tuning (0 = no deadline)"}
    )
    finetune_decay: float = field(default=SRSTE_DEFAULT_DECAY, metadata={"help": "SR-STE lambda of the fine-tune"})
    stop_tolerance: float = field(default=1e-3, metadata={"help": "stop when sparsity >= target - tolerance"})

    def __post_init__(self) -> None:
        if not 0.0 < self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
        for name in ("check_every_steps", "penalty_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.vote_ratio <= 1.0:
            raise ValueError(f"vote_ratio must be in (0, 1], got {self.vote_ratio}")
        if not 0.0 <= self.unstructured_fraction <= 1.0:
            raise ValueError(f"unstructured_fraction must be in [0, 1], got {self.unstructured_fraction}")
        for name in ("penalty_strength", "finetune_decay", "unstructured_steps", "finetune_steps", "stop_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if any(c < 1 for c in self.candidates):
            raise ValueError(f"candidates must be positive integers, got {list(self.candidates)}")


@dataclass
class _LayerSearch:
    m: int
    axis: str
    pad: bool
    candidates: tuple[int, ...]
    n: int  # scheme n (a candidate)
    n_live: int  # n of the forward mask during the search
    thresholds: torch.Tensor | None = None
    frozen: bool = False

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "n_live": self.n_live, "frozen": self.frozen,
                "thresholds": None if self.thresholds is None else self.thresholds.clone()}


@register_method("usd")
class Usd(Method):
    Options = UsdOptions
    grad_rule = "masked"

    def __init__(self, options: UsdOptions | None = None) -> None:
        super().__init__(options)
        self.search: dict[str, _LayerSearch] = {}
        self.phase = "unstructured" if self.options.unstructured_steps > 0 else "search"
        self.params: dict[str, int] = {}
        self.flops: dict[str, float] = {}
        self.erk_sparsity: dict[str, float] = {}
        self.unstructured_density: dict[str, float] = {}
        self.factors: dict[str, float] = {}
        self.stop_step: int | None = None
        self.forced = False
        self.target_reached = False
        self.next_step = 0
        self._hooks: list[Any] = []

    # --------------------------------------------------------------------------------- set-up
    def prepare(self, layers: Layers, model: torch.nn.Module) -> None:
        o = self.options
        shapes = {}
        for fqn, layer in layers.items():
            patterns = set(layer.patterns)
            first = layer.patterns[0]
            if len(patterns) != 1 or not isinstance(first, NMPattern):
                raise MethodError(
                    f"usd searches one n:m per layer; {fqn} has patterns {layer.pattern_text} (add a rule giving "
                    "it a single pattern, or skip it)")
            cands = tuple(sorted(set(o.candidates))) if o.candidates else power_of_two_candidates(first.m)
            cands = tuple(c for c in cands if c <= first.n)
            if not cands:
                raise MethodError(f"{fqn}: no candidate n <= its starting {first}; candidates {list(o.candidates)}")
            self.search[fqn] = _LayerSearch(first.m, first.axis, first.pad, cands, first.n, first.n)
            shapes[fqn] = tuple(layer.module.weight.shape)
            self.params[fqn] = layer.module.weight.numel()
        if not shapes:
            raise MethodError("usd found no sparse layers to search")
        densities = erk_densities(shapes, 1.0 - o.target_sparsity, o.erk_power_scale)
        self.erk_sparsity = {f: 1.0 - d for f, d in densities.items()}
        unstructured = erk_densities(shapes, 1.0 - o.target_sparsity * o.unstructured_fraction, o.erk_power_scale)
        self.unstructured_density = unstructured
        for fqn, layer in layers.items():
            self._hooks.append(layer.module.register_forward_hook(self._flops_hook(fqn)))

    def _flops_hook(self, fqn: str):
        def hook(module, inputs, output):
            if fqn not in self.flops and isinstance(output, torch.Tensor) and output.dim() >= 2:
                positions = output.numel() // max(1, output.shape[0] * module.weight.shape[0])
                if module.weight.dim() == 2:  # Linear: [..., out]
                    positions = output.numel() // max(1, output.shape[0] * output.shape[-1])
                self.flops[fqn] = float(self.params[fqn] * max(1, positions))
        return hook

    def _drop_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ---------------------------------------------------------------------------- bookkeeping
    def density(self, fqn: str) -> float:
        s = self.search[fqn]
        return s.n / s.m

    def current_sparsity(self) -> float:
        """Sparsity of the current scheme over the selected layers (by params or FLOPs)."""
        weights = self.flops if self.options.budget == "flops" and len(self.flops) == len(self.search) else self.params
        if self.options.budget == "flops" and weights is self.params:
            raise MethodError("usd budget 'flops' needs one forward pass before the first check")
        total = sum(weights[f] for f in self.search)
        return 1.0 - sum(weights[f] * self.density(f) for f in self.search) / total

    def scheme(self) -> dict[str, str]:
        return {f: str(NMPattern(s.n, s.m, s.axis, s.pad)) for f, s in self.search.items()}  # type: ignore[arg-type]

    def _update_factors(self) -> None:
        flops = {f: self.flops.get(f, float(self.params[f])) for f in self.search}
        self.factors = penalty_factors(self.erk_sparsity, {f: self.density(f) for f in self.search}, flops,
                                       self.options.penalty_erk_weight, self.options.penalty_flops_weight)

    # ------------------------------------------------------------------------------- schedule
    def advance(self, step: int, layers: Layers) -> Plan:
        self.next_step = step
        patterns = {}
        for fqn, s in self.search.items():
            n = s.n_live if self.phase != "finetune" else s.n
            patterns[fqn] = (NMPattern(n, s.m, s.axis, s.pad),) * len(layers[fqn].patterns)  # type: ignore[arg-type]
        rule = ("srste", self.options.finetune_decay) if self.phase == "finetune" else ("masked", 0.0)
        return Plan(patterns, rule)

    def masks_due(self, step: int) -> bool:
        if self.phase == "unstructured":
            return (step + 1) % self.options.check_every_steps == 0
        return True

    def mask(self, layer: LayerState) -> torch.Tensor:
        if self.phase != "unstructured":
            return super().mask(layer)
        if layer.fqn not in self.unstructured_density:  # at attach time, before on_prepare: dense
            return torch.ones_like(layer.dense_weight, dtype=torch.bool)
        # Zhu & Gupta's gradual magnitude pruning: density from 1 to the layer's share along a cubic ramp
        density = Cubic(1.0, self.unstructured_density[layer.fqn], 0, self.options.unstructured_steps)(self.next_step)
        weight = layer.dense_weight.detach().abs().flatten()
        keep = max(1, round(density * weight.numel()))
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[torch.topk(weight, keep, sorted=False).indices] = True
        return mask.view_as(layer.dense_weight)

    def penalty(self, step: int, layers: Layers) -> torch.Tensor | None:
        o = self.options
        if self.phase != "search" or o.penalty_strength == 0 or step % o.penalty_every_steps:
            return None
        if not self.factors:
            self._update_factors()
        strength = o.penalty_strength * 2.0 ** sum(1 for s in o.penalty_doubling_steps if s <= step)
        total = None
        for fqn, layer in layers.items():
            factor = self.factors.get(fqn, 0.0)
            if factor == 0.0:
                continue
            term = (layer.dense_weight * layer.parametrization.keep).pow(2).sum() * (0.5 * strength * factor)
            total = term if total is None else total + term
        return total

    def after_step(self, step: int, layers: Layers) -> Plan:
        o = self.options
        nxt = step + 1
        if self._hooks and len(self.flops) == len(self.search):
            self._drop_hooks()
        if self.phase == "unstructured":
            if nxt % o.check_every_steps == 0:  # gradual magnitude pruning: pruned weights are zero
                with torch.no_grad():
                    for layer in layers.values():
                        layer.dense_weight.mul_(layer.parametrization.keep)
            if nxt >= o.unstructured_steps:
                with torch.no_grad():
                    for layer in layers.values():
                        layer.dense_weight.mul_(layer.parametrization.keep)
                self.phase = "search"
                return self._refresh(nxt, layers)
            return Plan()
        if self.phase != "search":
            return Plan()
        deadline = self.total_steps - o.finetune_steps if (o.finetune_steps and self.total_steps) else None
        plan = Plan()
        if nxt % o.check_every_steps == 0:
            plan = self.check(nxt, layers)
        if self.phase == "search" and deadline is not None and nxt >= deadline:
            self.force_completion()
            plan = self._finish_search(nxt, layers)
        return plan

    def _refresh(self, step: int, layers: Layers) -> Plan:
        """Enter a new phase: patterns and rules for ``step``, masks recomputed from the weights now."""
        plan = self.advance(step, layers)
        plan.refresh = True
        return plan

    @torch.no_grad()
    def check(self, step: int, layers: Layers) -> Plan:
        """One DominoSearch vote in every layer; stops the search when the scheme meets the target.

        Returns:
            The plan for ``step`` (masks follow when a layer's scheme changed).
        """
        o = self.options
        changed = False
        for fqn, s in self.search.items():
            if s.n <= s.candidates[0]:
                continue
            groups = to_groups(layers[fqn].dense_weight.detach().abs().float(),
                               NMPattern(s.m, s.m, s.axis, s.pad))  # type: ignore[arg-type]
            if s.thresholds is None or not s.frozen:
                s.thresholds = domino_thresholds(groups)
            if votes_to_lower(groups, s.thresholds, s.n_live, o.vote_ratio):
                s.n_live = max(s.candidates[0], s.n_live - 1)
                s.frozen = True
                if s.n_live in s.candidates and s.n_live != s.n:
                    s.n = s.n_live
                    changed = True
        if changed:
            self._update_factors()
            if self.current_sparsity() >= o.target_sparsity - o.stop_tolerance:
                self.target_reached = True
                return self._finish_search(step, layers)
        return self.advance(step, layers)

    def force_completion(self) -> None:
        """Lower schemes (strongest penalty factor first) until the target is met or no layer can go lower."""
        o = self.options
        self._update_factors()
        while self.current_sparsity() < o.target_sparsity - o.stop_tolerance:
            movable = [f for f, s in self.search.items() if s.n > s.candidates[0]]
            if not movable:
                break
            fqn = max(movable, key=lambda f: (self.factors.get(f, 0.0), self.params[f], f))
            s = self.search[fqn]
            s.n = max(c for c in s.candidates if c < s.n)
            s.n_live = min(s.n_live, s.n)
            self.forced = True
            self._update_factors()
        self.target_reached = self.current_sparsity() >= o.target_sparsity - o.stop_tolerance

    def _finish_search(self, step: int, layers: Layers) -> Plan:
        self.phase = "finetune"
        self.stop_step = step
        return self._refresh(step, layers)

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase, "stop_step": self.stop_step, "forced": self.forced,
            "target_reached": self.target_reached, "layers": {f: s.state() for f, s in self.search.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layers = state.get("layers", {})
        if set(layers) != set(self.search):
            raise MethodError("usd state names other layers than this model's selection")
        self.phase, self.stop_step = state["phase"], state["stop_step"]
        self.forced, self.target_reached = state["forced"], state["target_reached"]
        for fqn, entry in layers.items():
            s = self.search[fqn]
            s.n, s.n_live, s.frozen, s.thresholds = entry["n"], entry["n_live"], entry["frozen"], entry["thresholds"]
        self.factors = {}

    def summary(self) -> dict[str, Any]:
        sparsity = None
        with contextlib.suppress(MethodError):
            sparsity = round(self.current_sparsity(), 6)
        return {"scheme": self.scheme(), "phase": self.phase, "search_stop_step": self.stop_step,
                "target_sparsity": self.options.target_sparsity, "achieved_sparsity": sparsity,
                "budget": self.options.budget, "target_reached": self.target_reached, "forced": self.forced}
