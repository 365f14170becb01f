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
Every choice and update is a ratio of entries of :math:`H^{-1}`, so H's scale does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..mask import topk_groups
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
                    block_columns: int = 128, *, reuse_hessian: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M SparseGPT on a 2-D weight ``[rows, cols]`` with groups of m consecutive columns.

    ``hessian`` may be ``X^T X`` at any positive scale (every choice and update is a ratio of its
    inverse's entries). With ``reuse_hessian`` a float32 ``hessian`` is dampened in place and its
    diagonal restored on return, instead of copied: one ``cols x cols`` workspace instead of three.

    Returns:
        ``(pruned_weight, mask)``; float32, mask True = kept, exactly n kept per group.
    """
    w = weight.detach().clone().float()
    rows, cols = w.shape
    h = hessian.detach()
    if not (reuse_hessian and h.dtype == torch.float32):
        h = h.clone().float()
    diag = h.diagonal()
    saved = diag.clone()
    dead = saved == 0
    w[:, dead] = 0.0
    hinv = torch.empty_like(h).t()  # column-major: LAPACK then works in this buffer, no temporaries
    try:
        live_mean = saved[~dead].mean() if bool((~dead).any()) else torch.tensor(1.0)
        diag[dead] = live_mean  # dead inputs are decoupled; any positive value of H's scale will do
        diag += dampening * live_mean
        torch.linalg.cholesky(h, out=hinv)
        torch.cholesky_inverse(hinv, out=hinv)  # H^-1, then its upper Cholesky factor, in one buffer
        torch.linalg.cholesky(hinv, upper=True, out=hinv)
    except torch.linalg.LinAlgError:
        raise MethodError("sparsegpt: the calibration Hessian is not positive definite even after dampening; "
                          "raise sparsegpt dampening or use more calibration samples") from None
    finally:
        diag.copy_(saved)
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
                mask[:, start + i : start + i + m] = topk_groups(group, n)  # mask.py's tie rule
            col = w1[:, i]
            q = col * mask[:, start + i]
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = err
        w[:, start:end] = q1
        if end < cols:
            w[:, end:].addmm_(err1, hinv[start:end, end:], alpha=-1.0)
    return w.mul_(mask), mask


@register_method("sparsegpt")
class SparseGPT(CalibratedMethod):
    Options = SparsegptOptions
    needs_hessian = True

    def prune_weight(
        self, weight: torch.Tensor, patterns: tuple[Pattern, ...], stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = weight.shape[0] // len(patterns)
        gram = stats.gram()  # X^T X, shared by the slices; used in place (sparsegpt is scale-free)
        weights, masks = [], []
        for index, pattern in enumerate(patterns):
            if not isinstance(pattern, NMPattern) or pattern.axis == "out":
                raise MethodError(f"sparsegpt prunes n:m groups along inputs (axis 'in' or 'flat'); got {pattern}")
            w2d = weight[index * rows : (index + 1) * rows].detach().reshape(rows, -1).float()  # [rows, in*kh*kw]
            order = _column_order(weight.shape, pattern)
            h = gram
            if order is not None:
                w2d, h = w2d[:, order], gram[order][:, order]
            pruned, mask = sparsegpt_prune(w2d, h, pattern.n, pattern.m, self.options.dampening,
                                           self.options.block_columns, reuse_hessian=True)
            if order is not None:
                inverse = torch.argsort(order)
                pruned, mask = pruned[:, inverse], mask[:, inverse]
            weights.append(pruned.reshape(rows, *weight.shape[1:]))
            masks.append(mask.reshape(rows, *weight.shape[1:]))
        if len(patterns) == 1:
            return weights[0].to(weight.dtype), masks[0]
        return torch.cat(weights).to(weight.dtype), torch.cat(masks)
