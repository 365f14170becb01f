r"""Mask refinement: swap kept and pruned weights where the swap lowers the layer's output error.

A one-shot mask (magnitude, Wanda, SparseGPT, RIA) is chosen by a per-weight score. What the
model feels is the layer's output error over the calibration inputs X (``[tokens, in]``):

.. math:: E = \| (W - \hat W) X^\top \|^2 = \sum_r e_r G e_r^\top,\quad e = W - \hat W,\quad G = X^\top X

Rows are independent. For a row with error ``e`` and ``g = e G``, making a kept weight ``i``
pruned and a pruned weight ``j`` kept (``\hat W = W \odot mask``: no weight update) changes ``e`` by
``w_i \delta_i - w_j \delta_j`` and E by, exactly,

.. math:: \Delta E = 2 (w_i g_i - w_j g_j) + w_i^2 G_{ii} + w_j^2 G_{jj} - 2 w_i w_j G_{ij}

For n:m patterns a swap stays inside one group of m (the pattern holds); for 1xN patterns (a block
of N output rows keeps the same input columns) a swap exchanges a kept column for a pruned one of
the same block row and the rows' changes add up. Each round takes, per row (block row), the best
swap of every group; the best ``k`` of those are tried together and the exact change of E with
them all is computed; where it is not a decrease the single best swap is taken (always a decrease
when one exists). So E never rises, and a row stops when no swap lowers it. This is the greedy
swap search of DSnoT (Zhang et al., ICLR 2024) and "SparseSwaps", with the exact error instead of
DSnoT's surrogate. Everything is vectorised over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pattern import BlockPattern, NMPattern, Pattern

__all__ = ["RefineResult", "refine_mask", "layer_error", "refinable"]


@dataclass
class RefineResult:
    """What a refinement did to one layer: the new mask, the swaps made, rounds run and the
    output error ``sum_r e_r G e_r^T`` of ``W * mask`` before and after."""

    mask: torch.Tensor
    swaps: int
    rounds: int
    error_before: float
    error_after: float


def refinable(weight_shape: tuple[int, ...], patterns: tuple[Pattern, ...]) -> str:
    """Why refinement cannot run on a layer with this weight shape and these patterns, or ''."""
    if len(weight_shape) != 2:
        return "refinement takes Linear layers (2-D weights)"
    if len(set(patterns)) != 1:
        return "refinement takes one pattern per layer, not row slices of several"
    pattern = patterns[0]
    if isinstance(pattern, NMPattern):
        if pattern.axis != "in":
            return f"refinement takes n:m groups along the input axis, not {pattern.axis!r}"
        if weight_shape[1] % pattern.m:
            return f"{weight_shape[1]} input features are not a multiple of m = {pattern.m}"
        if pattern.n == pattern.m:
            return "a dense n:m pattern has nothing to swap"
        return ""
    if isinstance(pattern, BlockPattern):
        if weight_shape[0] % pattern.block:
            return f"{weight_shape[0]} output features are not a multiple of the block {pattern.block}"
        return ""
    return f"refinement does not support pattern {pattern}"


def layer_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row output error ``e G e^T`` (float64 sums), ``e = weight - new_weight``."""
    e = (weight - new_weight).float()
    return ((e @ gram) * e).sum(1, dtype=torch.float64)


@torch.no_grad()
def refine_mask(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, pattern: Pattern, *,
                max_rounds: int = 200, batch: int = 16) -> RefineResult:
    """Refine ``mask`` (True = kept) of the 2-D ``weight`` against the Gram matrix ``gram = X^T X``.

    The result keeps ``pattern`` (n kept per group of m along the input axis, or the same number of
    kept columns per block row) and its error ``sum_r e_r G e_r^T`` of ``weight * mask`` is never
    higher than the input mask's. ``max_rounds`` bounds the rounds; ``batch`` is the number of
    swaps tried together per row and round (1: one swap per round).

    Raises:
        ValueError: a layer or pattern refinement does not take (see :func:`refinable`), or shapes
            that do not match.
    """
    if why := refinable(tuple(weight.shape), (pattern,)):
        raise ValueError(why)
    if mask.shape != weight.shape or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"shapes do not match: weight {tuple(weight.shape)}, mask {tuple(mask.shape)}, "
                         f"gram {tuple(gram.shape)} (want [in, in])")
    if max_rounds < 0 or batch < 1:
        raise ValueError(f"max_rounds must be >= 0 and batch >= 1, got {max_rounds} and {batch}")
    w = weight.detach().float()
    g_mat = gram.detach().float()
    if isinstance(pattern, BlockPattern):
        return _refine_blocks(w, mask.clone(), g_mat, pattern.block, max_rounds, batch)
    return _refine_nm(w, mask.clone(), g_mat, pattern.m, max_rounds, batch)


def _total(err_rows: torch.Tensor) -> float:
    return float(err_rows.sum())


_REFRESH = 32  # rounds between exact recomputations of g = e G (updated by the swaps' deltas in between)


def _apply(g: torch.Tensor, gm: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
    """``g += D G`` for the sparse change ``D`` of the error (``values`` at ``(rows, cols)``): the cost
    of the swaps made, not of a full ``e G`` product."""
    delta = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, g.shape, check_invariants=False)
    g += torch.sparse.mm(delta, gm)


def _refine_nm(w: torch.Tensor, mask: torch.Tensor, gm: torch.Tensor, m: int, max_rounds: int,
               batch: int) -> RefineResult:
    rows, cols = w.shape
    groups = cols // m
    diag = gm.diagonal()
    # the m x m diagonal blocks of G: G_ij for i, j in the same group
    gblk = gm.view(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [groups, m, m]
    e = w * ~mask
    g = e @ gm
    err = (g * e).sum(1, dtype=torch.float64)
    before = _total(err)
    active = torch.ones(rows, dtype=torch.bool)
    swaps = rounds = 0
    wg = w.view(rows, groups, m)
    wd = w * w * diag
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (rounds is reported)
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            rounds -= 1
            break
        wr, gr, kr = w[idx], g[idx], mask[idx]
        a = (2 * wr * gr + wd[idx]).view(-1, groups, m)  # remove a kept weight
        b = (-2 * wr * gr + wd[idx]).view(-1, groups, m)  # restore a pruned one
        wi = wg[idx]
        delta = a.unsqueeze(3) + b.unsqueeze(2) - 2 * wi.unsqueeze(3) * wi.unsqueeze(2) * gblk
        km = kr.view(-1, groups, m)
        valid = km.unsqueeze(3) & ~km.unsqueeze(2)
        delta = delta.masked_fill(~valid, float("inf")).view(-1, groups, m * m)
        best, where = delta.min(2)  # per group: best swap and its (i, j)
        k = min(batch, groups)
        top, gsel = best.topk(k, dim=1, largest=False)
        i_col = gsel * m + where.gather(1, gsel) // m
        j_col = gsel * m + where.gather(1, gsel) % m
        ok = top < 0
        # exact change of E with every tried swap of a row at once
        dvec = torch.cat([w[idx.unsqueeze(1), i_col] * ok, -w[idx.unsqueeze(1), j_col] * ok], 1)
        cidx = torch.cat([i_col, j_col], 1)
        sub = gm[cidx.unsqueeze(2), cidx.unsqueeze(1)]
        change = 2 * (dvec * gr.gather(1, cidx)).sum(1) + torch.einsum("ri,rij,rj->r", dvec, sub, dvec)
        single = change >= 0  # take only the best swap where the batch does not lower E
        use = ok.clone()
        use[single] = False
        use[single, 0] = ok[single, 0]
        improved = use.any(1)
        if not bool(improved.any()):
            break
        active[idx[~improved]] = False
        r_i, c_i = idx.unsqueeze(1).expand_as(i_col)[use], i_col[use]
        r_j, c_j = idx.unsqueeze(1).expand_as(j_col)[use], j_col[use]
        mask[r_i, c_i] = False
        mask[r_j, c_j] = True
        e[r_i, c_i] = w[r_i, c_i]
        e[r_j, c_j] = 0.0
        rows_changed = idx[improved]
        if rounds % _REFRESH:
            _apply(g, gm, torch.cat([r_i, r_j]), torch.cat([c_i, c_j]), torch.cat([w[r_i, c_i], -w[r_j, c_j]]))
        else:
            g[rows_changed] = e[rows_changed] @ gm
        err[rows_changed] = (g[rows_changed] * e[rows_changed]).sum(1, dtype=torch.float64)
        swaps += int(use.sum())
    return RefineResult(mask, swaps, rounds, before, _total(((e @ gm) * e).sum(1, dtype=torch.float64)))


def _refine_blocks(w: torch.Tensor, mask: torch.Tensor, gm: torch.Tensor, block: int, max_rounds: int,
                   batch: int) -> RefineResult:
    rows, cols = w.shape
    nb = rows // block
    diag = gm.diagonal()
    e = w * ~mask
    g = e @ gm
    err_rows = (g * e).sum(1, dtype=torch.float64)
    before = _total(err_rows)
    keep = mask.view(nb, block, cols)[:, 0, :].clone()  # the block row's kept columns
    swaps = rounds = 0
    active = torch.ones(nb, dtype=torch.bool)
    wb = w.view(nb, block, cols)
    wd = (wb * wb).sum(1) * diag  # sum over the block's rows of w_c^2 G_cc, [nb, cols]
    for rounds in range(1, max_rounds + 1):  # noqa: B007
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            rounds -= 1
            break
        wr = wb[idx]  # [k, block, cols]
        gr = g.view(nb, block, cols)[idx]
        wgs = (wr * gr).sum(1)  # sum_r w_rc g_rc
        a = (2 * wgs + wd[idx]).masked_fill(~keep[idx], float("inf"))  # remove kept column c
        b = (-2 * wgs + wd[idx]).masked_fill(keep[idx], float("inf"))  # restore pruned column c
        k = min(batch, int(keep[0].sum()), int((~keep[0]).sum()))
        if k == 0:
            break
        # candidates: the k best columns to remove and to restore, all their pairs (cross term exact)
        ai, ic = a.topk(k, 1, largest=False)
        bj, jc = b.topk(k, 1, largest=False)
        wi = wr.gather(2, ic.unsqueeze(1).expand(-1, block, -1))  # [k, block, k]
        wj = wr.gather(2, jc.unsqueeze(1).expand(-1, block, -1))
        gij = gm[ic.unsqueeze(2), jc.unsqueeze(1)]  # [rows, k, k]
        cross = torch.einsum("rbi,rbj->rij", wi, wj) * gij
        delta = ai.unsqueeze(2) + bj.unsqueeze(1) - 2 * cross
        best = delta.view(len(idx), -1).min(1)
        ok = best.values < 0
        if not bool(ok.any()):
            break
        active[idx[~ok]] = False
        sel = idx[ok]
        flat = best.indices[ok]
        i_col = ic[ok].gather(1, (flat // k).unsqueeze(1)).squeeze(1)
        j_col = jc[ok].gather(1, (flat % k).unsqueeze(1)).squeeze(1)
        keep[sel, i_col] = False
        keep[sel, j_col] = True
        ev = e.view(nb, block, cols)
        ev[sel, :, i_col] = wb[sel, :, i_col]
        ev[sel, :, j_col] = 0.0
        rows_changed = (sel.unsqueeze(1) * block + torch.arange(block)).reshape(-1)
        if rounds % _REFRESH:
            ci = i_col.repeat_interleave(block)
            cj = j_col.repeat_interleave(block)
            _apply(g, gm, torch.cat([rows_changed, rows_changed]), torch.cat([ci, cj]),
                   torch.cat([w[rows_changed, ci], -w[rows_changed, cj]]))
        else:
            g[rows_changed] = e[rows_changed] @ gm
        err_rows[rows_changed] = (g[rows_changed] * e[rows_changed]).sum(1, dtype=torch.float64)
        swaps += int(ok.sum())
    mask = keep.unsqueeze(1).expand(nb, block, cols).reshape(rows, cols).clone()
    return RefineResult(mask, swaps, rounds, before, _total(((e @ gm) * e).sum(1, dtype=torch.float64)))
