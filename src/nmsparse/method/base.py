"""The method contracts: what a registered sparsity algorithm provides.

Two kinds of method share one registry and one options mechanism (:class:`MethodBase`):

* :class:`Method` -- a **training** method, driven by the Sparsifier. It composes the pure parts
  (a score, a gradient rule, a mask cadence, a dense-factor schedule, an optional loss penalty)
  and may keep state of its own (:meth:`Method.state_dict`). It never reaches into the Sparsifier:
  :meth:`Method.advance` and :meth:`Method.after_step` return a :class:`Plan` (new patterns, a new
  gradient rule, a mask refresh) that the Sparsifier applies. It reads layers through
  :class:`LayerState` (module, patterns, attached :class:`~nmsparse.parametrize.MaskParametrization`).
* :class:`CalibratedMethod` -- a **one-shot** method that needs statistics of each layer's inputs
  (:class:`LayerStats`); :func:`nmsparse.oneshot.prune` runs it layer by layer.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..mask import sliced_mask
from ..parametrize import MaskedWeight, MaskParametrization, dense_weight, get_parametrization
from ..pattern import Pattern
from ..schema import build
from ..score import magnitude

__all__ = ["MethodError", "MethodBase", "Method", "CalibratedMethod", "LayerState", "Plan", "LayerStats", "NoOptions",
           "METHODS", "register_method", "build_method", "list_methods"]


class MethodError(ValueError):
    """A method was used where it does not apply (e.g. a training method for one-shot pruning)."""


@dataclasses.dataclass
class NoOptions:
    """This method has no options."""


@dataclasses.dataclass
class LayerState:
    """A selected layer as methods see it: its module, its patterns (one per equal row slice) and,
    once attached, its mask parametrization. The Sparsifier owns and updates it."""

    fqn: str
    module: nn.Module
    patterns: tuple[Pattern, ...]

    @property
    def dense_weight(self) -> torch.Tensor:
        return dense_weight(self.module)

    @property
    def parametrization(self) -> MaskParametrization:
        return get_parametrization(self.module)  # type: ignore[return-value]

    @property
    def mask(self) -> torch.Tensor:
        return self.parametrization.mask

    @property
    def pattern_text(self) -> str:
        texts = [str(p) for p in self.patterns]
        return texts[0] if len(set(texts)) == 1 else ",".join(texts)


Layers = Mapping[str, LayerState]


@dataclasses.dataclass
class Plan:
    """What a training method wants changed before the next forward; the Sparsifier applies it.

    Attributes:
        patterns: ``{fqn: patterns}`` for layers whose patterns change (one per row slice).
        rule: ``(gradient rule, decay)`` for every layer, or None to leave the rules.
        refresh: recompute every mask from the method's scores now (also implied when
            ``patterns`` changes a layer's patterns).
    """

    patterns: dict[str, tuple[Pattern, ...]] = dataclasses.field(default_factory=dict)
    rule: tuple[str, float] | None = None
    refresh: bool = False

    def then(self, later: Plan) -> Plan:
        """This plan followed by ``later`` (later patterns and rule win; refresh if either asks)."""
        return Plan({**self.patterns, **later.patterns}, later.rule or self.rule, self.refresh or later.refresh)


class MethodBase:
    """What every registered method has: a name, strictly validated options, summary facts.

    Class attributes:
        name: registry name.
        Options: dataclass of the method's hyperparameters (validated strictly).
        one_shot: True when the method decides masks once (one-shot pruning of a trained model).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    one_shot: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def summary(self) -> dict[str, Any]:
        """JSON-able facts the run summary should record (e.g. a searched scheme)."""
        return {}


class Method(MethodBase):
    """A training method run by the Sparsifier; override only what differs from a fixed magnitude mask.

    Class attributes:
        grad_rule: ``"ste"``, ``"srste"`` or ``"masked"`` (see :mod:`nmsparse.grad`).
        one_shot: True when the masks it decides at ``prepare`` are final (``magnitude``), so it
            also serves one-shot pruning.
    """

    grad_rule: ClassVar[str] = "masked"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.total_steps: int | None = None

    @property
    def decay(self) -> float:
        """lambda_W of the srste rule (0 for other rules)."""
        return 0.0

    def score(self, layer: LayerState) -> torch.Tensor:
        """Per-weight importance of ``layer`` (default: magnitude of the dense weight)."""
        return magnitude(layer.dense_weight)

    def mask(self, layer: LayerState) -> torch.Tensor:
        """The layer's mask from its scores and patterns (one pattern per row slice)."""
        scores, absolute = self._scores(layer)
        return sliced_mask(scores, layer.patterns, absolute)

    def mask_into(self, layer: LayerState, out: torch.Tensor) -> None:
        """Write :meth:`mask` as 1/0 into ``out`` (the 0/1 buffer the forward multiplies by).

        Methods that keep the default :meth:`mask` rank and write in one pass (no bool mask, no
        copy: with masks recomputed every step, the copy cost as much as the ranking)."""
        if type(self).mask is Method.mask:
            scores, absolute = self._scores(layer)
            sliced_mask(scores, layer.patterns, absolute, out=out)
        else:
            out.copy_(self.mask(layer))

    def _scores(self, layer: LayerState) -> tuple[torch.Tensor, bool]:
        """(scores, absolute): plain magnitude ranks |W| inside the kernel, with no copy of W."""
        if type(self).score is Method.score:
            return layer.dense_weight.detach(), True
        return self.score(layer), False

    def parametrization(self, layer: LayerState, mask: torch.Tensor) -> torch.nn.Module:
        """The module attached to ``layer``'s weight: by default a :class:`MaskedWeight` with the
        method's gradient rule; methods that learn masks attach their own."""
        return MaskedWeight(mask, self.grad_rule, self.decay, layer.module.weight.dtype)

    def masks_due(self, step: int) -> bool:
        """Whether :meth:`Sparsifier.step` recomputes masks after optimizer step ``step``."""
        return False

    def dense_factor(self, step: int) -> float:
        """d: the factor pruned weights are multiplied by in the forward of optimizer step ``step``
        (0 = hard mask, 1 = dense)."""
        return 0.0

    def set_horizon(self, total_steps: int) -> None:
        """The run's length in optimizer steps (for schedules defined as fractions of the run)."""
        self.total_steps = total_steps

    def advance(self, step: int, layers: Layers) -> Plan:
        """Move the method's schedule to the forward of optimizer step ``step``.

        Called at :meth:`Sparsifier.prepare` (step 0), by every :meth:`Sparsifier.step` (with the
        next step) and after a state restore. Must be idempotent for a given step and state.

        Returns:
            The :class:`Plan` of patterns, rule and mask refresh for that forward.
        """
        return Plan()

    def prepare(self, layers: Layers, model: nn.Module) -> None:
        """Called once after masks are attached (set up per-layer state, hooks on the model)."""

    def after_step(self, step: int, layers: Layers) -> Plan:
        """Called by every :meth:`Sparsifier.step` after masks are updated for optimizer step ``step``
        (phase changes that depend on the weights just trained)."""
        return Plan()

    def penalty(self, step: int, layers: Layers) -> torch.Tensor | None:
        """An extra loss term for the forward of optimizer step ``step``, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")


class LayerStats:
    """Statistics of one layer's inputs over the calibration data, in im2col column order.

    A Linear input ``[..., in]`` gives ``in`` columns; a Conv2d input is unfolded to
    ``in * kh * kw`` columns (PyTorch's flatten order of the weight's trailing dims).

    Args:
        columns: number of input columns.
        hessian: also accumulate ``X^T X`` (columns x columns), needed by sparsegpt.
        drift: also accumulate ``(X_dense - X)^T X`` (asymmetric calibration): ``X_dense`` the same
            rows as the dense model computes them, ``X`` as the model being pruned does (see
            :meth:`add_pair`).
    """

    def __init__(self, columns: int, hessian: bool, drift: bool = False) -> None:
        self.columns = columns
        self.count = 0
        self.sq_sum = torch.zeros(columns, dtype=torch.float64)
        self.xtx = torch.zeros(columns, columns, dtype=torch.float32) if hessian or drift else None
        self.drift = torch.zeros(columns, columns, dtype=torch.float32) if drift else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of input rows ``[N, columns]``."""
        x = x.detach().reshape(-1, self.columns).float()
        self.count += x.shape[0]
        for chunk in x.split(256):  # bounded temporaries; the squares are summed in float64
            self.sq_sum += chunk.pow(2).sum(0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    @torch.no_grad()
    def add_pair(self, x_dense: torch.Tensor, x: torch.Tensor) -> None:
        """Add rows ``x`` (the model being pruned) with the same rows ``x_dense`` as the dense model computes
        them: ``x`` as :meth:`add` does, and ``(x_dense - x)^T x`` into :attr:`drift`."""
        self.add(x)
        x = x.detach().reshape(-1, self.columns).float()
        delta = x_dense.detach().reshape(-1, self.columns).float() - x
        self.drift.addmm_(delta.t(), x)

    def input_norm(self) -> torch.Tensor:
        """||X_j||_2 over all calibration rows, per column (float32)."""
        return self.sq_sum.sqrt().float()

    def gram(self) -> torch.Tensor:
        """``X^T X`` itself (not a copy): float32 ``[columns, columns]``."""
        if self.xtx is None:
            raise MethodError("this layer's Hessian was not collected")
        return self.xtx


class CalibratedMethod(MethodBase, abc.ABC):
    """A one-shot method that needs calibration statistics of each layer's inputs.

    It is run by :func:`nmsparse.oneshot.prune`, layer by layer (block by block for transformers);
    :meth:`prune_weight` returns the new weight (dense with zeros; methods such as sparsegpt also
    update kept weights) and its mask. It is not a training method: a Sparsifier refuses it.
    """

    one_shot = True
    needs_hessian: ClassVar[bool] = False

    @abc.abstractmethod
    def prune_weight(
        self, weight: torch.Tensor, patterns: tuple, stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new_weight, mask)`` for one layer from its calibration statistics."""

    def reweigh(self, weight: torch.Tensor, mask: torch.Tensor, patterns: tuple, stats: LayerStats) -> torch.Tensor:
        """The new weight for a given ``mask`` (after a mask refinement): ``weight * mask`` for methods
        that do not update kept weights; methods that do (sparsegpt) re-solve them for the mask."""
        return weight.detach() * mask


METHODS: Registry[type[MethodBase]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def decorate(cls: type[MethodBase]) -> type[MethodBase]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorate


def build_method(name: str, options: dict[str, Any] | None = None) -> MethodBase:
    """Instantiate method ``name`` with validated ``options``.

    Raises:
        RegistryError: unknown method name.
        ConfigError: unknown or mistyped option (names the option and the nearest valid one).
    """
    cls = METHODS.get(name)
    return cls(build(cls.Options, options or {}, path=f"{name}"))


def list_methods() -> list[str]:
    return METHODS.names()
