"""Scale tuning after one-shot pruning: the few parameters that the N:M pattern leaves free, fitted by
distillation from the dense model, with every weight and mask held.

What it trains (a few hundred thousand numbers for SmolLM2-135M: 0.25% of its parameters):

* the gains (and shifts) of the model's normalisation layers (RMSNorm, LayerNorm, BatchNorm, GroupNorm);
* one scale per output channel of every pruned layer, and one per input channel of every pruned Linear;
* the biases of the pruned layers.

A scale of a row or a column of a weight keeps every zero where it is, so after the run the scales are
folded into the weights (``W <- diag(s_out) W diag(s_in)``, ``b <- s_out * b``): the model goes back to
an ordinary model of its own architecture with the same N:M masks, exported and run like any other.

Why: the pruned layers' outputs shrink and turn (each keeps half its weights); the layer-wise solvers
(SparseGPT) correct each layer on its own inputs, but the scale of what reaches the next norm and the
residual stream drifts block after block. Fitting only scales against the dense model's next-token
distributions corrects that drift while, with so few free numbers, fitting the calibration text no
harder than the masks already do. SmolLM2-135M 2:4 after ``best``'s masks: perplexity on text of
another source 2.73x dense before, 1.99x after four minutes and 1.97x after six on two CPU cores
(docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..method import MethodError
from .recover import Recovery, distil, resolve_objective

__all__ = ["Tuning", "tune_scales", "tunable_norms"]


@dataclass
class Tuning(Recovery):
    """Scale tuning after pruning (:func:`tune_scales`): a :class:`~.recover.Recovery`'s fields, with the
    tuning's own learning rate. Scales start at 1: 3e-3 measured best for SmolLM2 (1e-3: 2.11x, 1e-2: 2.24x
    against 2.00x dense perplexity in the same four minutes)."""

    lr: float = 3e-3

    @classmethod
    def of_budget(cls, config: Any, batches: list[Any] | None, steps: int | None, minutes: float | None) -> Tuning:
        """The tuning of a :class:`~.config.PruneConfig` with the budget of its
        :meth:`~.config.PruneConfig.tune_budget`, training on ``batches``."""
        if not batches:
            raise MethodError("scale tuning needs training batches: give calibration= (a model in memory tunes on "
                              "them) or tune=Tuning(batches, ...)")
        return cls(batches, steps, minutes * 60 if minutes else None, config.tune_lr, config.recover_objective,
                   config.recover_precision)


def tunable_norms(model: nn.Module) -> list[nn.Module]:
    """The model's normalisation layers with learnable affine parameters (class names holding ``Norm``:
    LayerNorm, RMSNorm of any library, BatchNorm, GroupNorm)."""
    return [m for m in model.modules() if "Norm" in type(m).__name__
            and any(p is not None for p in (getattr(m, "weight", None), getattr(m, "bias", None)))]


class _Scales:
    """A learnable output-channel scale on each pruned layer and an input-channel scale on each pruned
    Linear, applied by forward hooks (start: ones), and their folding into the weights."""

    def __init__(self, model: nn.Module, fqns: list[str]) -> None:
        self.layers: list[tuple[nn.Module, nn.Parameter, nn.Parameter | None]] = []
        self.handles: list[Any] = []
        for fqn in fqns:
            module = model.get_submodule(fqn)
            weight = module.weight
            s_out = nn.Parameter(torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device))
            s_in = (nn.Parameter(torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device))
                    if isinstance(module, nn.Linear) else None)
            self.layers.append((module, s_out, s_in))
            if s_in is not None:
                self.handles.append(module.register_forward_pre_hook(_scale_input(s_in)))
            self.handles.append(module.register_forward_hook(_scale_output(s_out, s_in is not None)))

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, s_out, s_in in self.layers for p in (s_out, s_in) if p is not None]

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply the scales into the weights and biases, then remove the hooks."""
        for module, s_out, s_in in self.layers:
            shape = (-1,) + (1,) * (module.weight.dim() - 1)
            factor = s_out.view(shape)
            if s_in is not None:
                factor = factor * s_in.view(1, -1)
            module.weight.mul_(factor.to(module.weight.dtype))
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(s_out.to(module.bias.dtype))
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _scale_input(scale: nn.Parameter):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * scale.to(args[0].dtype),) + tuple(args[1:])
    return hook


def _scale_output(scale: nn.Parameter, channels_last: bool):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        factor = scale.to(output.dtype)
        return output * (factor if channels_last else factor.view((-1,) + (1,) * (output.dim() - 2)))
    return hook


def tune_scales(student: nn.Module, teacher: nn.Module, layers: list[dict[str, Any]], batches: list[Any],
                steps: int | None = None, max_seconds: float | None = None, lr: float = 3e-3,
                progress: str = "auto", objective: str = "auto", precision: str = "auto") -> dict[str, Any]:
    """Fit the norms, the pruned layers' biases and per-channel scales of ``student`` (pruned, dense with
    zeros, without parametrizations) to ``teacher`` (the dense original) by distillation; every other
    parameter is held, and the scales are folded into the weights at the end (see the module docstring).

    Args:
        layers: manifest entries of the pruned layers (``fqn``): the layers that get scales.
        batches / steps / max_seconds / lr / progress / objective / precision: as
            :func:`nmsparse.oneshot.recover`'s (``lr`` default 3e-3: the scales start at 1).

    Returns:
        :func:`nmsparse.oneshot.recover`'s stats plus ``params`` (numbers trained) and ``what``.

    Raises:
        MethodError: a pruned layer that is neither Linear nor Conv.
    """
    objective = resolve_objective(student, batches, objective, steps, max_seconds, "cosine")
    fqns = [entry["fqn"] for entry in layers]
    for fqn, module in zip(fqns, modules := [student.get_submodule(f) for f in fqns]):
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            raise MethodError(f"scale tuning scales pruned Linear and Conv layers; {fqn} is a "
                              f"{type(module).__name__} (leave out tuning, or prune only Linear/Conv layers)")
    held = {name: p.requires_grad for name, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    norms = tunable_norms(student)
    biases = [m.bias for m in modules if getattr(m, "bias", None) is not None]
    free = [p for m in norms for p in (getattr(m, "weight", None), getattr(m, "bias", None))
            if isinstance(p, nn.Parameter)] + biases
    for p in free:
        p.requires_grad_(True)
    scales = _Scales(student, fqns)
    params = list({id(p): p for p in free}.values()) + scales.parameters()
    try:
        stats = distil(student, teacher, params, batches, objective, steps, max_seconds, lr, progress,
                       precision=precision)
    finally:
        scales.fold()
        for name, p in student.named_parameters():
            p.requires_grad_(held.get(name, True))
    stats["params"] = sum(p.numel() for p in params)
    stats["what"] = f"{len(norms)} norms, {len(fqns)} pruned layers' channel scales" + (" and biases" if biases else "")
    return stats
