r"""``ria``: relative importance and activations (Zhang et al., "Plug-and-Play: An Efficient
Post-training Pruning Method for Large Language Models", ICLR 2024).

Score :math:`S_{ij} = \left(\frac{|W_{ij}|}{\sum_k |W_{ik}|} + \frac{|W_{ij}|}{\sum_k |W_{kj}|}\right)
\|X_j\|_2^{a}` with ``a = 0.5``: a weight counts relative to the other weights of its output row and
of its input column, so no row or input channel is pruned away wholesale; within each group of m
along a row the n highest scores are kept. No weight update (combine with ``--refine`` to lower each
layer's output error further). The paper's channel permutation is ``--permute``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..mask import sliced_mask
from ..pattern import Pattern
from ..score import relative_importance
from .base import CalibratedMethod, LayerStats, register_method


@dataclass
class RiaOptions:
    power: float = field(default=0.5, metadata={"help": "exponent a of the input norm ||X_j||^a"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.power <= 4.0:
            raise ValueError(f"power must be in [0, 4], got {self.power}")


@register_method("ria")
class Ria(CalibratedMethod):
    Options = RiaOptions
    needs_hessian = False

    def prune_weight(
        self, weight: torch.Tensor, patterns: tuple[Pattern, ...], stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norms = stats.input_norm().reshape(weight.shape[1:])
        mask = sliced_mask(relative_importance(weight, norms, self.options.power), patterns)
        return weight.detach() * mask, mask
