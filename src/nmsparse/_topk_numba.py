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


# Every kernel writes `one` for a kept entry and 0 for a pruned one into `out`: a bool mask viewed
# as uint8 (one = 1), or a float32 0/1 mask viewed as int32 (one = 0x3f800000, the bits of 1.0f),
# which the forward multiplies by directly. Integer stores vectorise; bool -> float conversions in
# the loop did not (measured 3x slower), and a separate bool -> float copy cost as much as the mask.
@numba.njit(inline="always", cache=True)
def rank4(a0, a1, a2, a3, k, one, o0, o1, o2, o3, p):
    # rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; kept when rank_i < k
    c01 = np.int32(a1 > a0)
    c02 = np.int32(a2 > a0)
    c03 = np.int32(a3 > a0)
    c12 = np.int32(a2 > a1)
    c13 = np.int32(a3 > a1)
    c23 = np.int32(a3 > a2)
    o0[p] = one * (c01 + c02 + c03 < k)
    o1[p] = one * (1 - c01 + c12 + c13 < k)
    o2[p] = one * (2 - c02 - c12 + c23 < k)
    o3[p] = one * (3 - c03 - c13 - c23 < k)


@numba.njit(inline="always", cache=True)
def rank_m(flat, b, stride, m, k, absolute, one, out):
    for i in range(m):
        s_i = clean(flat[b + i * stride], absolute)
        rank = 0
        for j in range(m):
            s_j = clean(flat[b + j * stride], absolute)
            rank += np.int32(s_j > s_i) + np.int32((s_j == s_i) & (j < i))
        out[b + i * stride] = one * (rank < k)


# Contiguous groups (Linear weights, flat rows): group g is flat[m*g : m*g + m].
@numba.njit(parallel=True, cache=True, nogil=True)
def flat_4(flat, k, absolute, one, out):
    o1, o2, o3 = out[1:], out[2:], out[3:]  # o_j[b] is out[b + j]
    for g in numba.prange(flat.shape[0] // 4):
        b = 4 * g
        rank4(clean(flat[b], absolute), clean(flat[b + 1], absolute), clean(flat[b + 2], absolute),
              clean(flat[b + 3], absolute), k, one, out, o1, o2, o3, b)


@numba.njit(parallel=True, cache=True, nogil=True)
def flat_m(flat, m, k, absolute, one, out):
    for g in numba.prange(flat.shape[0] // m):
        rank_m(flat, m * g, 1, m, k, absolute, one, out)


# Strided groups: the weight viewed as [outer, width, inner]; a group is m entries of `width`
# at one (outer, inner) position, `inner` apart (conv input channels: inner = kh*kw; output
# channels: outer = 1). Each 4-row block is four contiguous rows of `inner`, taken as slices so
# that the loop over them vectorises; no permuted copies.
@numba.njit(parallel=True, cache=True, nogil=True)
def strided_4(flat, outer, width, inner, k, absolute, one, out):
    blocks = width // 4
    for ob in numba.prange(outer * blocks):
        b = (ob // blocks) * width * inner + (ob % blocks) * 4 * inner
        r0, r1, r2, r3 = flat[b:b + inner], flat[b + inner:b + 2 * inner], flat[b + 2 * inner:b + 3 * inner], \
            flat[b + 3 * inner:b + 4 * inner]
        o0, o1, o2, o3 = out[b:b + inner], out[b + inner:b + 2 * inner], out[b + 2 * inner:b + 3 * inner], \
            out[b + 3 * inner:b + 4 * inner]
        for p in range(inner):
            rank4(clean(r0[p], absolute), clean(r1[p], absolute), clean(r2[p], absolute), clean(r3[p], absolute),
                  k, one, o0, o1, o2, o3, p)


@numba.njit(parallel=True, cache=True, nogil=True)
def strided_m(flat, outer, width, inner, m, k, absolute, one, out):
    blocks = width // m
    for ob in numba.prange(outer * blocks):
        base = (ob // blocks) * width * inner + (ob % blocks) * m * inner
        for p in range(inner):
            rank_m(flat, base + p, inner, m, k, absolute, one, out)


# The SR-STE backward at d = 0 (nmsparse.grad): g + decay * (w - out) in one pass over the three
# tensors (torch needs two: a temporary w - out, then the add), flat float32 arrays.
@numba.njit(parallel=True, cache=True, nogil=True)
def decay_grad(g, w, o, decay, res):
    for i in numba.prange(g.shape[0]):
        res[i] = g[i] + decay * (w[i] - o[i])


# SR-STE's decay added in place to an accumulated gradient (nmsparse.grad.add_decay_); k is the
# 0/1 mask. No output array: nothing of the weight's size is allocated.
@numba.njit(parallel=True, cache=True, nogil=True)
def decay_into(g, w, k, decay):
    for i in numba.prange(g.shape[0]):
        g[i] += decay * (w[i] - w[i] * k[i])
