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

Joint sparsify + quantize (the paper's Section 3.5, as GPTQ quantizes): with ``weights`` int8 /
int4, the kept values of each quantization group (the columns of ``group_size`` kept values, as the
runtime groups them) are rounded to a symmetric grid chosen at the group's first column, and ``q_c`` above is the
rounded value: each column's rounding error is spread over the later columns with its pruning
error. The group's grid is set at its first column from the values its masks would keep if chosen
then; the masks themselves are still chosen per group of m as the columns come. One-shot pruning
then snaps every layer to the runtime's grid
(:func:`nmsparse.oneshot.quantize.snap_to_grid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..mask import topk_groups
from ..pattern import BlockPattern, NMPattern, Pattern
from ..quantgrid import group_scales, nm_chunk, parse_weights, qrange
from .base import CalibratedMethod, LayerStats, MethodError, register_method


@dataclass
class SparsegptOptions:
    dampening: float = field(default=0.01, metadata={"help": "fraction of mean(diag H) added to the diagonal"})
    block_columns: int = field(default=128, metadata={"help": "columns per lazy-update block (a multiple of m)"})
    weights: str = field(default="fp32", metadata={"help": "fp32, or int8 / int4: quantize inside the updates"})
    group_size: int = field(default=64, metadata={"help": "kept values per quantization scale"})

    def __post_init__(self) -> None:
        parse_weights(self.weights, self.group_size)  # QuantError (a ValueError) on a bad value
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


def live_mean(diagonal: torch.Tensor) -> torch.Tensor:
    """The mean of a Gram matrix's diagonal over the inputs that fire (1 where none does): the scale that
    dampening is a fraction of."""
    live = diagonal != 0
    return diagonal[live].mean() if bool(live.any()) else torch.tensor(1.0)


def _inverse_factor(hessian: torch.Tensor, dampening: float, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened ``H^-1`` and the inputs that never
    fire (``H_cc = 0``; decoupled, their weights pruned first). With ``reuse`` a float32 ``hessian``
    is dampened in place and its diagonal restored before returning."""
    h = hessian.detach()
    if not (reuse and h.dtype == torch.float32):
        h = h.clone().float()
    diag = h.diagonal()
    saved = diag.clone()
    dead = saved == 0
    hinv = torch.empty_like(h).t()  # column-major: LAPACK then works in this buffer, no temporaries
    try:
        scale = live_mean(saved)
        diag[dead] = scale  # dead inputs are decoupled; any positive value of H's scale will do
        diag += dampening * scale
        torch.linalg.cholesky(h, out=hinv)
        torch.cholesky_inverse(hinv, out=hinv)  # H^-1, then its upper Cholesky factor, in one buffer
        torch.linalg.cholesky(hinv, upper=True, out=hinv)
    except torch.linalg.LinAlgError:
        raise MethodError("sparsegpt: the calibration Hessian is not positive definite even after dampening; "
                          "raise sparsegpt dampening or use more calibration samples") from None
    finally:
        diag.copy_(saved)
    return hinv, dead


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, dampening: float = 0.01,
                    block_columns: int = 128, *, reuse_hessian: bool = False,
                    select_block: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor] | None = None,
                    quant: tuple[int, int] | None = None,
                    fixed_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M SparseGPT on a 2-D weight ``[rows, cols]`` with groups of m consecutive columns.

    With ``select_block`` the mask of each lazy block of ``block_columns`` (a multiple of ``m``) is
    chosen at once, at the block's start, by ``select_block(w_block, hinv_diag_block, start, end)``
    (how SparseGPT picks unstructured and block masks) instead of per group of m.

    ``hessian`` may be ``X^T X`` at any positive scale (every choice and update is a ratio of its
    inverse's entries). With ``reuse_hessian`` a float32 ``hessian`` is dampened in place and its
    diagonal restored on return, instead of copied: one ``cols x cols`` workspace instead of three.

    ``fixed_mask`` (True = kept): no mask is chosen; the OBS updates compensate for pruning exactly
    these weights (the re-solve after a mask refinement, :mod:`nmsparse.refine`).

    ``quant = (bits, group_columns)``: joint quantization (see the module docstring): the kept values
    of each group of ``group_columns`` columns are rounded to the ``bits``-bit grid of
    :func:`nmsparse.quantgrid.group_scales` over those values, set at the group's first column.

    Returns:
        ``(pruned_weight, mask)``; float32, mask True = kept, exactly n kept per group.
    """
    w = weight.detach().clone().float()
    rows, cols = w.shape
    hinv, dead = _inverse_factor(hessian, dampening, reuse_hessian)
    w[:, dead] = 0.0
    mask = torch.zeros(rows, cols, dtype=torch.bool) if fixed_mask is None else fixed_mask.clone()
    block = max(m, (block_columns // m) * m)
    if quant is not None:
        bits, group_cols = quant
        block = max(block // group_cols, 1) * group_cols  # quantization groups inside lazy blocks
        lo, hi = qrange(bits)
        scale = torch.ones(rows)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[start:end, start:end]
        for i in range(end - start):
            if fixed_mask is None and select_block is not None and i == 0:  # the lazy block's mask at once
                mask[:, start:end] = select_block(w1, torch.diag(hinv1), start, end)
            if quant is not None and i % group_cols == 0:
                keep = None if fixed_mask is None else mask[:, start + i : start + i + group_cols]
                scale = _group_grid(w1[:, i : i + group_cols], torch.diag(hinv1)[i : i + group_cols], n, m, bits,
                                    keep)
            if (
                fixed_mask is None and select_block is None and i % m == 0
            ):  # choose the group's mask from the current (already updated) weights
                group = w1[:, i : i + m] ** 2 / torch.diag(hinv1)[i : i + m].reshape(1, -1) ** 2
                mask[:, start + i : start + i + m] = topk_groups(group, n)  # mask.py's tie rule
            col = w1[:, i]
            if quant is not None:
                col_q = torch.clamp(torch.round(col / scale), lo, hi) * scale
                q = col_q * mask[:, start + i]
            else:
                q = col * mask[:, start + i]
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = err
        w[:, start:end] = q1
        if end < cols:
            w[:, end:].addmm_(err1, hinv[start:end, end:], alpha=-1.0)
    return w.mul_(mask), mask


def _group_grid(w: torch.Tensor, hinv_diag: torch.Tensor, n: int, m: int, bits: int,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row step of a quantization group's grid (``[rows]``, :func:`~nmsparse.quantgrid.group_scales`)
    over the values the group's n:m masks would keep if chosen now (SparseGPT's saliency), or over
    ``keep`` where the mask is given."""
    if keep is None:
        saliency = w**2 / hinv_diag.reshape(1, -1) ** 2
        keep = topk_groups(saliency.reshape(-1, m), n).reshape(w.shape[0], -1)
    return group_scales((w * keep).unsqueeze(1), bits).squeeze(1)


def _block_selector(pattern: BlockPattern, channels: int, kernel: int):
    """The lazy-block mask of 1xN SparseGPT: each block row (``pattern.block`` output rows) keeps, of the
    input channels in the lazy block, its quota of the row's ``kept_per_row`` channels (cumulative
    rounding, so the quotas sum to it exactly), the channels with the largest summed OBS error
    ``w^2 / [H^-1]_cc^2`` over the block's rows and the channel's kernel columns."""
    kept = pattern.kept_per_row(channels)

    def select(w1: torch.Tensor, diag: torch.Tensor, start: int, end: int) -> torch.Tensor:
        rows, width = w1.shape
        first, last = start // kernel, end // kernel  # the lazy block holds whole channels
        quota = round(kept * last / channels) - round(kept * first / channels)
        err = (w1 ** 2 / diag.reshape(1, -1) ** 2).reshape(rows // pattern.block, pattern.block, last - first, kernel)
        scores = err.sum(dim=(1, 3))  # [block rows, channels in the lazy block]
        keep = topk_groups(scores, quota) if quota > 0 else torch.zeros_like(scores, dtype=torch.bool)
        return keep[:, None, :, None].expand(-1, pattern.block, -1, kernel).reshape(rows, width)

    return select


@register_method("sparsegpt")
class SparseGPT(CalibratedMethod):
    Options = SparsegptOptions
    needs_hessian = True

    def _quant(self, pattern: NMPattern, weight: torch.Tensor, columns: int) -> tuple[int, int] | None:
        """``(bits, group columns)`` of joint quantization for a Linear weight whose runtime groups are
        whole column ranges (:func:`~nmsparse.runtime.quant.activation_block`'s rule), else None (the
        layer is rounded after pruning instead)."""
        scheme = parse_weights(self.options.weights, self.options.group_size)
        if scheme is None or weight.dim() != 2 or pattern.axis != "in" or columns % pattern.m:
            return None
        jc = nm_chunk(columns, pattern.n, pattern.m)
        gm = min(scheme.group, jc)
        if (gm * pattern.m) % pattern.n or jc % gm:
            return None
        return scheme.bits, gm * pattern.m // pattern.n

    def prune_weight(
        self, weight: torch.Tensor, patterns: tuple[Pattern, ...], stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = weight.shape[0] // len(patterns)
        gram = stats.gram()  # X^T X, shared by the slices; used in place (sparsegpt is scale-free)
        weights, masks = [], []
        for index, pattern in enumerate(patterns):
            if isinstance(pattern, BlockPattern):
                w2d = weight[index * rows : (index + 1) * rows].detach().reshape(rows, -1).float()
                kernel = w2d.shape[1] // weight.shape[1]  # columns of one input channel (kh * kw)
                pruned, mask = sparsegpt_prune(
                    w2d, gram, 1, kernel, self.options.dampening, self.options.block_columns, reuse_hessian=True,
                    select_block=_block_selector(pattern, weight.shape[1], kernel))
                weights.append(pruned.reshape(rows, *weight.shape[1:]))
                masks.append(mask.reshape(rows, *weight.shape[1:]))
                continue
            if not isinstance(pattern, NMPattern) or pattern.axis == "out":
                raise MethodError(f"sparsegpt prunes n:m groups along inputs (axis 'in' or 'flat') or 1xN blocks; "
                                  f"got {pattern}")
            w2d = weight[index * rows : (index + 1) * rows].detach().reshape(rows, -1).float()  # [rows, in*kh*kw]
            order = _column_order(weight.shape, pattern)
            h = gram
            if order is not None:
                w2d, h = w2d[:, order], gram[order][:, order]
            pruned, mask = sparsegpt_prune(w2d, h, pattern.n, pattern.m, self.options.dampening,
                                           self.options.block_columns, reuse_hessian=True,
                                           quant=self._quant(pattern, weight, w2d.shape[1]))
            if order is not None:
                inverse = torch.argsort(order)
                pruned, mask = pruned[:, inverse], mask[:, inverse]
            weights.append(pruned.reshape(rows, *weight.shape[1:]))
            masks.append(mask.reshape(rows, *weight.shape[1:]))
        if len(patterns) == 1:
            return weights[0].to(weight.dtype), masks[0]
        return torch.cat(weights).to(weight.dtype), torch.cat(masks)

    def reweigh(self, weight: torch.Tensor, mask: torch.Tensor, patterns: tuple[Pattern, ...],
                stats: LayerStats) -> torch.Tensor:
        """The OBS updates for a given mask of a 2-D weight with one n:m pattern (after refinement)."""
        pattern = patterns[0]
        if weight.dim() != 2 or len(patterns) != 1 or not isinstance(pattern, NMPattern):
            return super().reweigh(weight, mask, patterns, stats)
        pruned, _ = sparsegpt_prune(weight.detach().float(), stats.gram(), pattern.n, pattern.m,
                                    self.options.dampening, self.options.block_columns, reuse_hessian=True,
                                    quant=self._quant(pattern, weight, weight.shape[1]), fixed_mask=mask)
        return pruned.to(weight.dtype)
