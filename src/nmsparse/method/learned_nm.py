r"""``learned_nm``: learned n:m masks (semi-structured sparsity by masking; Danhofer, arXiv 2411.00288).

Every group of m weights gets learnable logits over its C(m, n) valid patterns (the six 2:4
patterns for 2:4). Training draws a pattern per group with the straight-through Gumbel-softmax:
:math:`y = \mathrm{softmax}((z + g)/\tau)`, the forward uses the exact one-hot pattern of
:math:`\arg\max y` and the gradient flows to z through y. When C(m, n) exceeds
``max_patterns`` (e.g. 4:16), a top-n Gumbel relaxation over per-weight logits is used instead
(hard top-n forward, gradient through :math:`n\,\mathrm{softmax}((z + g)/\tau)`).

Differences from the reference code, on purpose:

* logits can start from the magnitude pattern (``init: magnitude``, the default), so training starts
  at the one-shot magnitude mask instead of a random one;
* evaluation, :attr:`LearnedMask.mask`, squash and export use the deterministic argmax pattern
  (the reference evaluates with a random draw);
* the pattern table is a constant, never trained (the reference let the optimizer drift it);
* with ``train: masks`` (weights frozen, the dense model kept intact) batch-norm statistics can be
  frozen too (``freeze_bn_stats``), so every original tensor is bit-identical after training.

Groups run along input channels (``2:4``) or, with the ``flat`` axis (``2:4@flat``), along each
output row in PyTorch's (in, kh, kw) flatten order, the K order of an im2col GEMM.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..mask import from_groups, nm_mask, to_groups
from ..pattern import NMPattern
from ..schedule import Constant, Cosine, Geometric, Linear, Schedule
from .base import Layers, LayerState, Method, MethodError, Plan, register_method

__all__ = ["LearnedNMOptions", "LearnedNM", "LearnedMask", "pattern_table"]


def pattern_table(n: int, m: int) -> torch.Tensor:
    """All C(m, n) binary rows with n ones, ``[C(m, n), m]`` float, in lexicographic order."""
    rows = []
    for kept in itertools.combinations(range(m), n):
        row = [0.0] * m
        for k in kept:
            row[k] = 1.0
        rows.append(row)
    return torch.tensor(rows)


class LearnedMask(nn.Module):
    """Parametrization ``W -> W * mask(logits)`` with a learned n:m mask (see module docstring).

    In training mode the mask is a straight-through Gumbel sample; in eval mode it is the argmax
    pattern. ``mask``/``keep`` always give the argmax pattern.
    """

    def __init__(self, weight: torch.Tensor, pattern: NMPattern, relaxation: str, init: str, init_scale: float,
                 prior: torch.Tensor | None = None) -> None:
        super().__init__()
        self.pattern = pattern
        self.shape = tuple(weight.shape)
        self.relaxation = relaxation
        scores = weight.detach().abs().float()
        if prior is not None:  # the prior mask's kept weights first, magnitude among the rest (MaskLLM's prior)
            scores = prior.to(scores.dtype) * (1.0 + scores.max()) + scores
            init = "magnitude"
        groups = to_groups(scores, pattern)  # [G, m]
        if relaxation == "patterns":
            table = pattern_table(pattern.n, pattern.m)
            self.register_buffer("table", table, persistent=False)
            logits = torch.zeros(groups.shape[0], table.shape[0])
            if init == "magnitude":
                kept = nm_mask(groups, NMPattern(pattern.n, pattern.m, "in"), absolute=True).float()  # [G, m]
                best = (kept @ table.t()).argmax(dim=1)  # the pattern equal to the magnitude mask
                logits[torch.arange(groups.shape[0]), best] = init_scale
        else:
            self.table = None
            logits = torch.zeros_like(groups)
            if init == "magnitude":
                logits = init_scale * groups / groups.amax(dim=1, keepdim=True).clamp_min(1e-12)
        self.logits = nn.Parameter(logits)
        self.temperature = 1.0
        # the MaskParametrization protocol: the rule is the method's own (straight-through Gumbel)
        self.dense_factor, self.rule, self.decay = 0.0, "learned", 0.0

    def _hard(self, scores: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return nn.functional.one_hot(scores.argmax(dim=1), self.table.shape[0]).to(scores.dtype)
        return nm_mask(scores.detach(), NMPattern(self.pattern.n, self.pattern.m, "in")).to(scores.dtype)

    def group_mask(self) -> torch.Tensor:
        """``[G, m]`` mask: a straight-through Gumbel sample in training, the argmax in eval."""
        logits = self.logits
        if not self.training:
            hard = self._hard(logits.detach())
            return hard @ self.table if self.table is not None else hard
        uniform = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
        perturbed = (logits - torch.log(-torch.log(uniform))) / self.temperature
        if self.table is not None:
            soft = torch.softmax(perturbed, dim=1)
            choice = self._hard(perturbed.detach()) - soft.detach() + soft
            return choice @ self.table
        soft = self.pattern.n * torch.softmax(perturbed, dim=1)
        return self._hard(perturbed.detach()) - soft.detach() + soft

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = from_groups(self.group_mask().to(weight.dtype), self.shape, self.pattern)
        return weight * mask

    @property
    def mask(self) -> torch.Tensor:
        """The deterministic (argmax) mask, bool, shaped like the weight."""
        hard = self._hard(self.logits.detach())
        groups = hard @ self.table if self.table is not None else hard
        return from_groups(groups, self.shape, self.pattern) > 0.5

    @property
    def keep(self) -> torch.Tensor:
        return self.mask.to(self.logits.dtype)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Masks come from the logits (saved with the model's state): nothing to restore."""

    def entropy(self) -> float:
        """Mean entropy of the pattern distributions (0 = every group decided)."""
        p = torch.softmax(self.logits.detach(), dim=1)  # over patterns, or over positions (top-n)
        return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, relaxation={self.relaxation}, temperature={self.temperature:g}"


@dataclass
class LearnedNMOptions:
    train: Literal["masks", "masks_and_weights"] = field(
        default="masks", metadata={"help": "masks: weights frozen (the dense model stays intact); or both"})
    freeze_bn_stats: bool = field(
        default=True, metadata={"help": "masks mode: batch norm uses and keeps its running stats"}
    )
    init: Literal["magnitude", "uniform"] = field(
        default="magnitude", metadata={"help": "logits start at the magnitude pattern or uniform"}
    )
    init_scale: float = field(default=3.0, metadata={"help": "logit of the magnitude pattern at the start"})
    init_masks: str | None = field(
        default=None, metadata={"help": "start from the masks of a one-shot export (directory or .safetensors; "
                                        "its zeros): each group's logit of that pattern is init_scale"})
    temperature: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature"})
    temperature_end: float | None = field(default=None, metadata={"help": "anneal to this temperature over the run"})
    anneal: Literal["linear", "cosine", "geometric"] = field(
        default="geometric", metadata={"help": "shape of the anneal (geometric: a constant ratio a step)"})
    max_patterns: int = field(default=70, metadata={"help": "above this C(m, n), use the top-n relaxation"})

    def __post_init__(self) -> None:
        if self.temperature <= 0 or (self.temperature_end is not None and self.temperature_end <= 0):
            raise ValueError("temperatures must be > 0")
        if self.max_patterns < 2:
            raise ValueError(f"max_patterns must be >= 2, got {self.max_patterns}")


@register_method("learned_nm")
class LearnedNM(Method):
    Options = LearnedNMOptions
    grad_rule = "ste"

    def __init__(self, options: LearnedNMOptions | None = None) -> None:
        super().__init__(options)
        self._bn_hooks: list = []

    def parametrization(self, layer: LayerState, mask: torch.Tensor) -> nn.Module:
        patterns = set(layer.patterns)
        pattern = layer.patterns[0]
        if len(patterns) != 1 or not isinstance(pattern, NMPattern):
            raise MethodError(f"learned_nm learns one n:m pattern per layer; {layer.fqn} has {layer.pattern_text}")
        count = math.comb(pattern.m, pattern.n)
        relaxation = "patterns" if count <= self.options.max_patterns else "topn"
        prior = self._prior(layer) if self.options.init_masks else None
        return LearnedMask(layer.dense_weight, pattern, relaxation, self.options.init, self.options.init_scale, prior)

    def _prior(self, layer: LayerState) -> torch.Tensor:
        """The layer's mask in the ``init_masks`` export: its weight's nonzeros (bool, the weight's shape)."""
        from pathlib import Path

        from safetensors import safe_open

        path = Path(self.options.init_masks)  # type: ignore[arg-type]
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise MethodError(f"learned_nm init_masks: no {path} (give a one-shot export directory or its "
                              ".safetensors file)")
        key = f"{layer.fqn}.weight"
        with safe_open(str(path), "pt") as f:
            if key not in set(f.keys()):
                raise MethodError(f"learned_nm init_masks: {path} has no {key}; was it pruned from this model?")
            weight = f.get_tensor(key)
        if tuple(weight.shape) != tuple(layer.dense_weight.shape):
            raise MethodError(f"learned_nm init_masks: {key} is {tuple(weight.shape)} in {path}, "
                              f"{tuple(layer.dense_weight.shape)} in the model")
        return weight != 0

    def prepare(self, layers: Layers, model: nn.Module) -> None:
        if self.options.train == "masks":
            learned = {id(layer.parametrization.logits) for layer in layers.values()}  # type: ignore[attr-defined]
            for param in model.parameters():
                if id(param) not in learned:
                    param.requires_grad_(False)
            if self.options.freeze_bn_stats:
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        self._bn_hooks.append(module.register_forward_pre_hook(_use_running_stats))

    def temperature_schedule(self) -> Schedule:
        """The Gumbel-softmax temperature over the run (constant without ``temperature_end`` or a horizon)."""
        o = self.options
        if o.temperature_end is None or self.total_steps is None:
            return Constant(o.temperature)
        kind = {"linear": Linear, "cosine": Cosine, "geometric": Geometric}[o.anneal]
        return kind(o.temperature, o.temperature_end, 0, max(1, self.total_steps))

    def temperature_at(self, step: int) -> float:
        return self.temperature_schedule()(step)

    def advance(self, step: int, layers: Layers) -> Plan:
        tau = self.temperature_at(step)
        for layer in layers.values():  # the method's own LearnedMask parametrizations
            layer.parametrization.temperature = tau  # type: ignore[attr-defined]
        return Plan()

    def mask(self, layer: LayerState) -> torch.Tensor:
        try:
            return layer.parametrization.mask
        except (AttributeError, IndexError):  # before attach: the magnitude mask
            return super().mask(layer)

    def summary(self) -> dict:
        return {"temperature_end": self.temperature_at(self.total_steps or 0)}


def _use_running_stats(module: nn.Module, inputs) -> None:
    module.training = False  # normalise with, and do not update, the running statistics
