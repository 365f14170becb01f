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

import contextlib
import functools

import numpy as np
import torch

__all__ = ["available", "topk_rows", "topk_strided"]


@functools.cache
def _kernels():
    import numba

    def clean(v, absolute):
        v = abs(v) if absolute else v
        return v if v == v else -np.inf  # NaN ranks lowest

    clean = numba.njit(inline="always")(clean)

    def rank4(a0, a1, a2, a3, k, out, b, stride):
        # rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; kept when rank_i < k
        out[b] = np.int32(a1 > a0) + np.int32(a2 > a0) + np.int32(a3 > a0) < k
        out[b + stride] = np.int32(a0 >= a1) + np.int32(a2 > a1) + np.int32(a3 > a1) < k
        out[b + 2 * stride] = np.int32(a0 >= a2) + np.int32(a1 >= a2) + np.int32(a3 > a2) < k
        out[b + 3 * stride] = np.int32(a0 >= a3) + np.int32(a1 >= a3) + np.int32(a2 >= a3) < k

    rank4 = numba.njit(inline="always")(rank4)

    def rank_m(flat, b, stride, m, k, absolute, out):
        for i in range(m):
            s_i = clean(flat[b + i * stride], absolute)
            rank = 0
            for j in range(m):
                s_j = clean(flat[b + j * stride], absolute)
                rank += np.int32(s_j > s_i) + np.int32((s_j == s_i) & (j < i))
            out[b + i * stride] = rank < k

    rank_m = numba.njit(inline="always")(rank_m)

    # Contiguous groups (Linear weights, flat rows): group g is flat[m*g : m*g + m].
    @numba.njit(parallel=True, cache=True, nogil=True)
    def flat_4(flat, k, absolute, out):
        for g in numba.prange(flat.shape[0] // 4):
            b = 4 * g
            rank4(clean(flat[b], absolute), clean(flat[b + 1], absolute), clean(flat[b + 2], absolute),
                  clean(flat[b + 3], absolute), k, out, b, 1)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def flat_m(flat, m, k, absolute, out):
        for g in numba.prange(flat.shape[0] // m):
            rank_m(flat, m * g, 1, m, k, absolute, out)

    # Strided groups: the weight viewed as [outer, width, inner]; a group is m entries of `width`
    # at one (outer, inner) position, `inner` apart (conv input channels: inner = kh*kw; output
    # channels: outer = 1). One integer division per m*inner elements; no permuted copies.
    @numba.njit(parallel=True, cache=True, nogil=True)
    def strided_4(flat, outer, width, inner, k, absolute, out):
        blocks = width // 4
        for ob in numba.prange(outer * blocks):
            base = (ob // blocks) * width * inner + (ob % blocks) * 4 * inner
            for p in range(inner):
                b = base + p
                rank4(clean(flat[b], absolute), clean(flat[b + inner], absolute),
                      clean(flat[b + 2 * inner], absolute), clean(flat[b + 3 * inner], absolute), k, out, b, inner)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def strided_m(flat, outer, width, inner, m, k, absolute, out):
        blocks = width // m
        for ob in numba.prange(outer * blocks):
            base = (ob // blocks) * width * inner + (ob % blocks) * m * inner
            for p in range(inner):
                rank_m(flat, base + p, inner, m, k, absolute, out)

    return flat_4, flat_m, strided_4, strided_m


@functools.cache
def available() -> bool:
    try:
        _kernels()
    except ImportError:
        return False
    return True


def topk_strided(scores: torch.Tensor, outer: int, width: int, inner: int, m: int, k: int,
                 absolute: bool = False) -> torch.Tensor:
    """Top-``k`` of every group of ``m`` along the middle axis of ``scores`` viewed as [outer, width, inner].

    Returns a bool mask with the shape of ``scores`` (no permuted copies are made).
    """
    flat = scores.detach().to(torch.float32).contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.bool)
    flat_4, flat_m, strided_4, strided_m = _kernels()
    src, dst, k, absolute = flat.numpy(), out.numpy(), int(k), bool(absolute)
    with torch_threads():
        if inner == 1:
            flat_4(src, k, absolute, dst) if m == 4 else flat_m(src, int(m), k, absolute, dst)
        elif m == 4:
            strided_4(src, outer, width, inner, k, absolute, dst)
        else:
            strided_m(src, outer, width, inner, int(m), k, absolute, dst)
    return out.reshape(scores.shape)


@contextlib.contextmanager
def torch_threads():
    """Run numba kernels on torch's thread count, and give torch its count back afterwards.

    numba's OpenMP layer sets the calling thread's OpenMP thread count when it launches, which
    silently changed torch's own ``get_num_threads()`` (and with it the reduction order, so results
    drifted between otherwise identical runs). This keeps the two in step.
    """
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def topk_rows(scores: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """Bool mask of the top ``k`` of each row of a CPU ``[G, m]`` score tensor (of |scores| if ``absolute``)."""
    return topk_strided(scores, scores.shape[0], scores.shape[1], 1, scores.shape[1], k, absolute)
