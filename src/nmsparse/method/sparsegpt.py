r"""``sparsegpt``: second-order one-shot pruning with weight updates (Frantar & Alistarh,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023, arXiv 2301.00774).

For a layer with weight W (rows x columns, columns = input features in the order the groups run)
and calibration Hessian :math:`H = \frac{2}{N} X X^\top`, columns are processed left to right. At the
first column of each group of m, the mask of the group is chosen per row by the OBS saliency
:math:`w^2 / [H^{-1}]_{cc}^2` (the m - n lowest are pruned); each column is then fixed (pruned
entries set to 0) and its error is spread over the not-yet-processed columns with the rows of the
upper Cholesky factor of :math:`H^{-1}` (lazy batch updates over blocks of columns):

.. math:: W_{:, c:} \mathrel{-}= \frac{w_c - q_c}{[H^{-1}]_{cc}} [H^{-1}]_{c, c:}

so the kept weights compensate for the pruned ones. Dampening adds ``dampening * mean(diag H)`` to
the diagonal; inputs that never fire (H_cc = 0) get their weights pruned first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pattern import NMPattern, Pattern
from .base import CalibratedMethod, LayerStats, MethodError, register_method


@dataclass
class SparsegptOptions:
    dampening: float = field(default=0.01, metadata={"help": "fraction of mean(diag H) added to the diagonal"})
    block_columns: int = field(default=128, metadata={"help": "columns per lazy-update block (a multiple of m)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.dampening < 1.0:
            raise ValueError(f"dampening must be in [0, 1), got {self.dampening}")
        if self.block_columns < 1:
            raise ValueError(f"block_columns must be >= 1, got {self.block_columns}")


def _column_order(shape: torch.Size, pattern: NMPattern) -> torch.Tensor | None:
    """Permutation of the flattened (in, kh, kw) columns so groups of m are consecutive, or None."""
    if len(shape) <= 2 or pattern.axis == "flat":
        return None
    inp, kernel = shape[1], int(torch.tensor(shape[2:]).prod())
    # column (c, k) of the PyTorch order sits at c * kernel + k; "in" groups want (k, c) order
    return torch.arange(inp * kernel).reshape(inp, kernel).t().reshape(-1)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, dampening: float = 0.01,
                    block_columns: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M SparseGPT on a 2-D weight ``[rows, cols]`` with groups of m consecutive columns.

    Returns:
        ``(pruned_weight, mask)``; float32, mask True = kept, exactly n kept per group.
    """
    w = weight.detach().clone().float()
    rows, cols = w.shape
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        hinv = torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise MethodError("sparsegpt: the calibration Hessian is not positive definite even after dampening; "
                          "raise sparsegpt dampening or use more calibration samples") from None
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    block = max(m, (block_columns // m) * m)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        for i in range(end - start):
            if i % m == 0:  # choose the group's mask from the current (already updated) weights
                group = w1[:, i : i + m] ** 2 / torch.diag(hinv1)[i : i + m].reshape(1, -1) ** 2
                keep = torch.zeros_like(group, dtype=torch.bool)
                keep.scatter_(1, torch.topk(group, n, dim=1).indices, True)
                mask[:, start + i : start + i + m] = keep
            col = w1[:, i]
            q = col * mask[:, start + i]
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, start:end] = q1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return w * mask, mask


@register_method("sparsegpt")
class SparseGPT(CalibratedMethod):
    Options = SparsegptOptions
    needs_hessian = True
    updates_weights = True

    def prune_weight(
        self, weight: torch.Tensor, patterns: tuple[Pattern, ...], stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = weight.shape[0] // len(patterns)
        hessian = stats.hessian_matrix()
        out_w, out_mask = weight.detach().clone().float(), torch.zeros(weight.shape, dtype=torch.bool)
        for index, pattern in enumerate(patterns):
            if not isinstance(pattern, NMPattern) or pattern.axis == "out":
                raise MethodError(f"sparsegpt prunes n:m groups along inputs (axis 'in' or 'flat'); got {pattern}")
            part = slice(index * rows, (index + 1) * rows)
            w2d = weight[part].detach().reshape(rows, -1).float()  # [rows, in * kh * kw]
            order = _column_order(weight.shape, pattern)
            h = hessian
            if order is not None:
                w2d, h = w2d[:, order], hessian[order][:, order]
            pruned, mask = sparsegpt_prune(w2d, h, pattern.n, pattern.m, self.options.dampening,
                                           self.options.block_columns)
            if order is not None:
                inverse = torch.argsort(order)
                pruned, mask = pruned[:, inverse], mask[:, inverse]
            out_w[part] = pruned.reshape(out_w[part].shape)
            out_mask[part] = mask.reshape(out_mask[part].shape)
        return out_w.to(weight.dtype), out_mask
