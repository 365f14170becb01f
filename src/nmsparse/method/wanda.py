r"""``wanda``: pruning by weights and activations (Sun et al., "A Simple and Effective Pruning
Approach for Large Language Models", ICLR 2024, arXiv 2306.11695).

Score :math:`S_{ij} = |W_{ij}| \cdot \|X_j\|_2`, the weight magnitude times the L2 norm of input
feature j over the calibration tokens; within each group of m along a row, the n highest scores
are kept (Wanda's N:M form compares weights per output row). No weight update.
"""

from __future__ import annotations

import torch

from ..mask import sliced_mask
from ..pattern import Pattern
from ..score import activation_weighted
from .base import CalibratedMethod, LayerStats, register_method


@register_method("wanda")
class Wanda(CalibratedMethod):
    needs_hessian = False

    def prune_weight(
        self, weight: torch.Tensor, patterns: tuple[Pattern, ...], stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norms = stats.input_norm().reshape(weight.shape[1:])  # [in] or [in, kh, kw]: im2col column norms
        scores = activation_weighted(weight, norms)
        mask = sliced_mask(scores, patterns)
        return weight.detach() * mask, mask
