"""The Sparsifier: the one stateful object binding a model, its selected layers, a method and patterns.

Lifecycle (shaped like torch.ao.pruning's, with time passed in explicitly)::

    sparsifier = Sparsifier("srste", pattern="2:4")
    sparsifier.prepare(model)            # attach mask parametrizations; model class untouched
    for step, batch in enumerate(loader):
        loss = criterion(model(x), y) + sparsifier.penalty()
        loss.backward(); optimizer.step()
        sparsifier.step(step)            # recompute masks on the method's cadence
    manifest_layers = sparsifier.squash() # bake masks into weights, remove parametrizations

Masks and the method's state live here and round-trip exactly through :meth:`state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .export.manifest import layer_entry
from .mask import sliced_satisfies
from .method import Method, MethodError, build_method
from .method.base import LayerState, Plan
from .parametrize import MaskedWeight, attach, dense_weight, input_map, is_attached, squash_module
from .pattern import Pattern, parse_pattern
from .select import LayerChoice, Selection, select_layers
from .version import __version__

__all__ = ["Sparsifier", "SparsifierError", "LayerState", "LayerReport"]

STATE_FORMAT = "nmsparse-sparsifier"
STATE_VERSION = 1


class SparsifierError(RuntimeError):
    """The sparsifier was used out of order, or given state that does not fit the model."""


@dataclass
class LayerReport:
    """One row of :meth:`Sparsifier.report`."""

    fqn: str
    shape: tuple[int, ...]
    pattern: str | None
    density: float
    verified: bool | None
    skip_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "fqn": self.fqn,
            "shape": list(self.shape),
            "pattern": self.pattern,
            "density": round(self.density, 6),
            "verified": self.verified,
            "skip_reason": self.skip_reason,
        }


class Sparsifier:
    """Binds a method and patterns to a model's layers.

    Args:
        method: registered method name (see :func:`nmsparse.method.list_methods`) or instance.
        pattern: default pattern, e.g. ``"2:4"`` or ``"1x16:0.25"``.
        selection: which layers, with rule overrides and guards.
        allocation: per-layer pattern overrides ``{fqn: pattern}`` (e.g. a searched scheme), or an
            allocator called at :meth:`prepare` with ``{fqn: weight shape}`` of the selected layers
            (e.g. :class:`nmsparse.allocate.ERKAllocator`); either takes precedence over the default
            pattern for layers no rule names.
        method_options: options of ``method`` when it is given by name.
    """

    def __init__(
        self,
        method: str | Method = "magnitude",
        pattern: str | Pattern = "2:4",
        selection: Selection | None = None,
        allocation: dict[str, str] | Callable[..., dict[str, Any]] | None = None,
        method_options: dict[str, Any] | None = None,
    ) -> None:
        self.method = build_method(method, method_options) if isinstance(method, str) else method
        if not isinstance(self.method, Method):
            raise MethodError(f"method {self.method.name!r} needs calibration data and decides masks once: use "
                              "nmsparse.oneshot.prune (or `nmsparse prune`), not a Sparsifier")
        self.pattern = parse_pattern(pattern)
        self.selection = selection or Selection()
        self.allocator = allocation if callable(allocation) else None
        self.allocation = (
            {} if callable(allocation) else {fqn: parse_pattern(p) for fqn, p in (allocation or {}).items()}
        )
        self.layers: dict[str, LayerState] = {}
        self.choices: list[LayerChoice] = []
        self.model: nn.Module | None = None
        self.last_step: int | None = None

    # ----------------------------------------------------------------------------------- lifecycle
    def prepare(self, model: nn.Module, total_steps: int | None = None) -> list[LayerReport]:
        """Select layers, compute initial masks and attach the parametrizations.

        Args:
            model: the model to sparsify (its class is not changed).
            total_steps: the run's length in optimizer steps, for methods whose schedule depends on
                it (phases, pattern stages); may also be given later with :meth:`set_horizon`.
                Time is counted in optimizer steps only: callers that train in epochs convert at
                their edge (``nmsparse.train.plan``).

        Returns:
            The per-layer report (:meth:`report`).
        """
        if self.model is not None:
            raise SparsifierError("prepare() was already called; build a new Sparsifier per model")
        self.model = model
        self.choices = select_layers(model, self.selection, self.pattern)
        if self.allocator is not None:
            shapes = {c.fqn: tuple(c.module.weight.shape) for c in self.choices if c.selected and c.rule is None}
            axis = getattr(self.pattern, "axis", "in")
            self.allocation = {f: parse_pattern(p) for f, p in self.allocator(shapes, axis=axis).items()}
        unknown = set(self.allocation) - {c.fqn for c in self.choices}
        if unknown:
            raise SparsifierError(f"allocation names layers the model does not have: {', '.join(sorted(unknown))}")
        for choice in self.choices:
            if not choice.selected:
                continue
            patterns = choice.patterns
            if choice.fqn in self.allocation and choice.rule is None:
                override = self.allocation[choice.fqn]
                override.check_shape(tuple(choice.module.weight.shape))
                patterns = (override,) * len(patterns)
            layer = LayerState(choice.fqn, choice.module, patterns)
            with torch.no_grad():
                # the float-buffer path update_masks uses: training runs one mask backend (the C++
                # kernels where a compiler exists), never also the bool one
                keep = torch.empty(choice.module.weight.shape, dtype=torch.float32, device=choice.module.weight.device)
                self.method.mask_into(layer, keep)
                mask = keep.bool()
            attach(choice.module, self.method.parametrization(layer, mask))
            self.layers[choice.fqn] = layer
        if total_steps is not None:
            self.method.set_horizon(int(total_steps))
        self.method.prepare(self.layers, model)
        self._configure(0, update=True)
        return self.report()

    def set_horizon(self, total_steps: int) -> None:
        """Tell the method how many optimizer steps the run has (phases and stages depend on it)."""
        self.method.set_horizon(int(total_steps))
        if self.model is not None and self.layers:
            self._configure(0 if self.last_step is None else self.last_step + 1, update=self.last_step is None)

    def _configure(self, next_step: int, update: bool, due: bool = False) -> None:
        """Set patterns, rules and the dense factor for the forward of optimizer step ``next_step``;
        with ``update``, recompute masks when the schedule changed or the cadence (``due``) says so."""
        self._apply(self.method.advance(next_step, self.layers), update, due)
        factor = float(self.method.dense_factor(next_step))
        for layer in self.layers.values():
            layer.parametrization.dense_factor = factor

    def _apply(self, plan: Plan, update: bool, due: bool = False) -> None:
        """Apply a method's plan: patterns (checked against each weight), rule, then masks when the
        patterns changed, the plan asks for a refresh, or the cadence (``due``) says so."""
        changed = plan.refresh
        for fqn, patterns in plan.patterns.items():
            layer = self.layers[fqn]
            patterns = tuple(patterns)
            if patterns != layer.patterns:
                rows = layer.module.weight.shape[0] // len(patterns)
                for p in patterns:
                    p.check_shape((rows,) + tuple(layer.module.weight.shape[1:]))
                layer.patterns = patterns
                changed = True
        if plan.rule is not None:
            rule, decay = plan.rule
            for layer in self.layers.values():
                param = layer.parametrization
                param.rule, param.decay = rule, float(decay)
        if update and (changed or due):
            self.update_masks()

    def _require_prepared(self) -> None:
        if self.model is None:
            raise SparsifierError("call prepare(model) first")
        if any(not is_attached(layer.module) for layer in self.layers.values()):
            raise SparsifierError("masks were already squashed; this sparsifier is finished")

    @torch.no_grad()
    def update_masks(self) -> None:
        """Recompute every layer's mask from the method's scores now."""
        self._require_prepared()
        for layer in self.layers.values():
            param = layer.parametrization
            if isinstance(param, MaskedWeight):  # ranked straight into the forward's 0/1 buffer
                self.method.mask_into(layer, param.keep)
            else:
                param.set_mask(self.method.mask(layer))

    def step(self, step: int) -> None:
        """Finish optimizer step ``step`` and set the model up for the forward of step ``step + 1``.

        Call right after ``optimizer.step()``; ``step`` counts optimizer steps from 0. The method
        first moves its schedule to ``step + 1`` (phases, pattern stages, rules); masks are then
        recomputed when the schedule changed or the method's cadence says so, and the dense factor
        of the next forward is set.
        """
        self._require_prepared()
        self._configure(step + 1, update=True, due=self.method.masks_due(step))
        self._apply(self.method.after_step(step, self.layers), update=True)
        self.last_step = step

    def penalty(self) -> torch.Tensor:
        """The method's extra loss term (a zero scalar when it has none)."""
        self._require_prepared()
        value = self.method.penalty(0 if self.last_step is None else self.last_step + 1, self.layers)
        return value if value is not None else torch.zeros(())

    @torch.no_grad()
    def squash(self, model: nn.Module | None = None) -> list[dict[str, Any]]:
        """Bake masks into the weights (pruned entries become zeros) and remove the parametrizations.

        Args:
            model: squash this copy of the prepared model instead (e.g. an EMA copy, whose
                parametrizations carry the same masks); the sparsifier's own model is untouched.

        Returns:
            Manifest entries, one per sparse layer (see :mod:`nmsparse.export`).
        """
        self._require_prepared()
        modules = dict(model.named_modules()) if model is not None else None
        entries = []
        for layer in self.layers.values():
            module = modules[layer.fqn] if modules is not None else layer.module
            squash_module(module, layer.mask)
            entries.append(layer_entry(layer.fqn, module.weight, layer.patterns, input_map(module)))
        return entries

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Complete state: patterns, masks, last step and the method's own state."""
        self._require_prepared()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "library_version": __version__,
            "method": self.method.name,
            "last_step": self.last_step,
            "layers": {
                fqn: {"patterns": [str(p) for p in layer.patterns], "mask": layer.mask.clone()}
                for fqn, layer in self.layers.items()
            },
            "method_state": self.method.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a sparsifier prepared on the same architecture."""
        self._require_prepared()
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SparsifierError("not a sparsifier state (missing format marker)")
        if not isinstance(state.get("version", 1), int) or state.get("version", 1) > STATE_VERSION:
            raise SparsifierError(f"sparsifier state version {state.get('version')!r} is newer than this nmsparse "
                                  f"reads ({STATE_VERSION}): upgrade nmsparse to load it")
        if state.get("method") != self.method.name:
            raise SparsifierError(
                f"state is for method {state.get('method')!r}, this sparsifier runs {self.method.name!r}"
            )
        layers = state.get("layers", {})
        if set(layers) != set(self.layers):
            missing, extra = set(self.layers) - set(layers), set(layers) - set(self.layers)
            raise SparsifierError(
                f"state layers do not match the model's selected layers (missing: {sorted(missing)[:5]}, "
                f"unexpected: {sorted(extra)[:5]})"
            )
        for fqn, entry in layers.items():
            layer = self.layers[fqn]
            mask = entry["mask"]
            if tuple(mask.shape) != tuple(layer.mask.shape):
                raise SparsifierError(
                    f"{fqn}: saved mask shape {list(mask.shape)} != weight shape {list(layer.mask.shape)}"
                )
            layer.patterns = tuple(parse_pattern(p) for p in entry["patterns"])
            layer.parametrization.set_mask(mask)
        self.last_step = state.get("last_step")
        self.method.load_state_dict(state.get("method_state", {}))
        # the masks are restored exactly: re-derive only rules and the dense factor
        self._configure(0 if self.last_step is None else self.last_step + 1, update=False)

    # ------------------------------------------------------------------------------------ report
    @torch.no_grad()
    def report(self) -> list[LayerReport]:
        """Per-layer table: fqn, shape, pattern, density of the effective weight, verified, skip reason."""
        rows = []
        for choice in self.choices:
            weight = choice.module.weight  # parametrized -> effective (masked) weight
            shape = tuple(weight.shape)
            if choice.fqn in self.layers and is_attached(choice.module):
                layer = self.layers[choice.fqn]
                hard = dense_weight(choice.module) * layer.parametrization.keep  # 0/1 in the weight's dtype
                rows.append(
                    LayerReport(
                        choice.fqn,
                        shape,
                        layer.pattern_text,
                        float((hard != 0).float().mean()),
                        sliced_satisfies(hard, layer.patterns),
                        None,
                    )
                )
            else:
                pattern = self.layers[choice.fqn].pattern_text if choice.fqn in self.layers else None
                verified = sliced_satisfies(weight, self.layers[choice.fqn].patterns) if pattern else None
                rows.append(
                    LayerReport(
                        choice.fqn, shape, pattern, float((weight != 0).float().mean()), verified, choice.skip_reason
                    )
                )
        return rows

