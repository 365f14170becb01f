"""numba kernels of :mod:`nmsparse._topk_cpu` (imported on first use; see there for what they compute).

Defined at module level with ``cache=True``: numba's on-disk cache then serves every later process
(measured: a fresh process's first mask update on resnet18 costs no JIT after the first run).
"""

import numba
import numpy as np


@numba.njit(inline="always", cache=True)
def clean(v, absolute):
    v = abs(v) if absolute else v
    return v if v == v else -np.inf  # NaN ranks lowest


@numba.njit(inline="always", cache=True)
def rank4(a0, a1, a2, a3, k, out, b, stride):
    # rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; kept when rank_i < k
    out[b] = np.int32(a1 > a0) + np.int32(a2 > a0) + np.int32(a3 > a0) < k
    out[b + stride] = np.int32(a0 >= a1) + np.int32(a2 > a1) + np.int32(a3 > a1) < k
    out[b + 2 * stride] = np.int32(a0 >= a2) + np.int32(a1 >= a2) + np.int32(a3 > a2) < k
    out[b + 3 * stride] = np.int32(a0 >= a3) + np.int32(a1 >= a3) + np.int32(a2 >= a3) < k


@numba.njit(inline="always", cache=True)
def rank_m(flat, b, stride, m, k, absolute, out):
    for i in range(m):
        s_i = clean(flat[b + i * stride], absolute)
        rank = 0
        for j in range(m):
            s_j = clean(flat[b + j * stride], absolute)
            rank += np.int32(s_j > s_i) + np.int32((s_j == s_i) & (j < i))
        out[b + i * stride] = rank < k


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


# The SR-STE backward at d = 0 (nmsparse.grad): g + decay * (w - out) in one pass over the three
# tensors (torch needs two: a temporary w - out, then the add), flat float32 arrays.
@numba.njit(parallel=True, cache=True, nogil=True)
def decay_grad(g, w, o, decay, res):
    for i in numba.prange(g.shape[0]):
        res[i] = g[i] + decay * (w[i] - o[i])
