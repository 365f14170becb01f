"""The method contract: what a registered sparsity algorithm provides to the Sparsifier.

A method composes the pure parts -- a score, a gradient rule, a mask cadence, a dense-factor
schedule and an optional loss penalty -- and may keep state of its own, which it returns from
:meth:`Method.state_dict`. It never edits a model: the Sparsifier applies what it decides.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._registry import Registry
from ..config.schema import build
from ..mask import sliced_mask
from ..parametrize import MaskedWeight
from ..score import magnitude

if TYPE_CHECKING:
    from ..sparsifier import LayerState, Sparsifier

__all__ = ["MethodError", "Method", "CalibratedMethod", "LayerStats", "NoOptions", "METHODS", "register_method", "build_method", "list_methods"]


class MethodError(ValueError):
    """A method was used where it does not apply (e.g. a training method for one-shot pruning)."""


@dataclasses.dataclass
class NoOptions:
    """This method has no options."""


class Method:
    """Base class: override only what differs from a fixed magnitude mask.

    Class attributes:
        name: registry name.
        Options: dataclass of the method's hyperparameters (validated strictly).
        grad_rule: ``"ste"``, ``"srste"`` or ``"masked"`` (see :mod:`nmsparse.grad`).
        one_shot: True when the method decides masks once, at ``prepare``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    grad_rule: ClassVar[str] = "masked"
    one_shot: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None

    @property
    def decay(self) -> float:
        """lambda_W of the srste rule (0 for other rules)."""
        return 0.0

    def score(self, layer: LayerState) -> torch.Tensor:
        """Per-weight importance of ``layer`` (default: magnitude of the dense weight)."""
        return magnitude(layer.dense_weight)

    def mask(self, layer: LayerState) -> torch.Tensor:
        """The layer's mask from its scores and patterns (one pattern per row slice)."""
        if type(self).score is Method.score:  # plain magnitude: |W| ranked inside the kernel, no copy
            return sliced_mask(layer.dense_weight.detach(), layer.patterns, absolute=True)
        return sliced_mask(self.score(layer), layer.patterns)

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

    def set_horizon(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """The run's length in optimizer steps (for schedules defined as fractions of the run) and,
        when the caller trains in epochs, the epoch length (for methods with an epoch cadence)."""
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch

    def advance(self, sparsifier: Sparsifier, step: int) -> bool:
        """Move the method's schedule to the forward of optimizer step ``step`` (patterns, rules).

        Called at :meth:`Sparsifier.prepare` (step 0), by every :meth:`Sparsifier.step` (with the
        next step) and after a state restore. Must be idempotent for a given step and state.

        Returns:
            True when masks must be recomputed now (e.g. a layer's pattern changed).
        """
        return False

    def summary(self) -> dict[str, Any]:
        """JSON-able facts the run summary should record (e.g. a searched scheme)."""
        return {}

    def on_prepare(self, sparsifier: Sparsifier) -> None:
        """Called once after masks are attached."""

    def on_step(self, sparsifier: Sparsifier, step: int) -> None:
        """Called by every :meth:`Sparsifier.step`, after masks are updated."""

    def penalty(self, sparsifier: Sparsifier) -> torch.Tensor | None:
        """An extra loss term, or None."""
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
    """

    def __init__(self, columns: int, hessian: bool) -> None:
        self.columns = columns
        self.count = 0
        self.sq_sum = torch.zeros(columns, dtype=torch.float64)
        self.xtx = torch.zeros(columns, columns, dtype=torch.float32) if hessian else None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of input rows ``[N, columns]``."""
        x = x.detach().reshape(-1, self.columns).float()
        self.count += x.shape[0]
        for chunk in x.split(256):  # bounded temporaries; the squares are summed in float64
            self.sq_sum += chunk.pow(2).sum(0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    def input_norm(self) -> torch.Tensor:
        """||X_j||_2 over all calibration rows, per column (float32)."""
        return self.sq_sum.sqrt().float()

    def gram(self) -> torch.Tensor:
        """``X^T X`` itself (not a copy): float32 ``[columns, columns]``."""
        if self.xtx is None:
            raise MethodError("this layer's Hessian was not collected")
        return self.xtx


class CalibratedMethod(Method, abc.ABC):
    """A one-shot method that needs calibration statistics of each layer's inputs.

    It is run by :func:`nmsparse.calibrate.prune_calibrated`, layer by layer (block by block for
    transformers); :meth:`prune_weight` returns the new weight (dense with zeros; methods such as
    sparsegpt also update kept weights) and its mask.
    """

    one_shot = True
    grad_rule = "masked"
    needs_hessian: ClassVar[bool] = False

    @abc.abstractmethod
    def prune_weight(
        self, weight: torch.Tensor, patterns: tuple, stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new_weight, mask)`` for one layer from its calibration statistics."""

    def mask(self, layer: LayerState) -> torch.Tensor:
        raise MethodError(
            f"method {self.name!r} needs calibration data: use nmsparse.calibrate.prune_calibrated "
            "(or `nmsparse prune --calib ...`), not a Sparsifier"
        )


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def decorate(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorate


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate method ``name`` with validated ``options``.

    Raises:
        RegistryError: unknown method name.
        ConfigError: unknown or mistyped option (names the option and the nearest valid one).
    """
    cls = METHODS.get(name)
    return cls(build(cls.Options, options or {}, path=f"{name}"))


def list_methods() -> list[str]:
    return METHODS.names()
