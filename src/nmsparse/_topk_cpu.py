"""CPU backend of :func:`nmsparse.mask.topk_groups`: fused, multithreaded numba kernels.

Mask computation runs after every optimizer step in SR-STE-style training and over every weight in
one-shot pruning, so it must cost far less than the step. The torch reference
(:func:`nmsparse.mask._topk_torch`) materialises several ``[G, m, m]`` temporaries; these kernels
read each group once and write its mask once. m = 4 (2:4, 1:4, 3:4) has a fully unrolled,
branch-free kernel (about 3x faster than the generic loop); other m use the generic rank loop. All
follow the tie rule of :mod:`nmsparse.mask`, and tests check they agree exactly with the torch path.
numba is imported lazily, on first use.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["available", "topk_rows"]


@functools.cache
def _kernels():
    import numba

    def clean(v, absolute):
        v = abs(v) if absolute else v
        return v if v == v else -np.inf  # NaN ranks lowest

    clean = numba.njit(inline="always")(clean)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def top_of_4(flat, k, absolute, out):
        # rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; kept when rank_i < k
        for g in numba.prange(flat.shape[0] // 4):
            b = 4 * g
            a0 = clean(flat[b], absolute)
            a1 = clean(flat[b + 1], absolute)
            a2 = clean(flat[b + 2], absolute)
            a3 = clean(flat[b + 3], absolute)
            out[b] = np.int32(a1 > a0) + np.int32(a2 > a0) + np.int32(a3 > a0) < k
            out[b + 1] = np.int32(a0 >= a1) + np.int32(a2 > a1) + np.int32(a3 > a1) < k
            out[b + 2] = np.int32(a0 >= a2) + np.int32(a1 >= a2) + np.int32(a3 > a2) < k
            out[b + 3] = np.int32(a0 >= a3) + np.int32(a1 >= a3) + np.int32(a2 >= a3) < k

    @numba.njit(parallel=True, cache=True, nogil=True)
    def top_of_m(flat, m, k, absolute, out):
        for g in numba.prange(flat.shape[0] // m):
            b = m * g
            for i in range(m):
                s_i = clean(flat[b + i], absolute)
                rank = 0
                for j in range(m):
                    s_j = clean(flat[b + j], absolute)
                    rank += np.int32(s_j > s_i) + np.int32((s_j == s_i) & (j < i))
                out[b + i] = rank < k

    return top_of_4, top_of_m


@functools.cache
def available() -> bool:
    try:
        _kernels()
    except ImportError:
        return False
    return True


def topk_rows(scores: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """Bool mask of the top ``k`` of each row of a CPU ``[G, m]`` score tensor (of |scores| if ``absolute``)."""
    m = scores.shape[1]
    flat = scores.detach().to(torch.float32).contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.bool)
    top_of_4, top_of_m = _kernels()
    if m == 4:
        top_of_4(flat.numpy(), int(k), bool(absolute), out.numpy())
    else:
        top_of_m(flat.numpy(), int(m), int(k), bool(absolute), out.numpy())
    return out.reshape(scores.shape)
