"""CPU kernels of the sparse runtime (numba, parallel over output rows, float32).

Why numba: it is already the project's CPU kernel technology (the mask kernels), compiles at first
use without a C++ toolchain on the user's machine, caches the machine code on disk, and its
``prange`` gives OpenMP-style threading over output block rows, where the uniform 1xN layout puts
equal work on every thread.

Layouts (see :mod:`nmsparse.runtime.formats`):

* 1xN blocks: ``cols[R, K]`` int32 input columns kept by block row r, ``vals[R, K, B]`` the B output
  weights of each kept block, contiguous. ``y[b, r*B + t] = sum_k x[b, cols[r, k]] * vals[r, k, t]``.
* n:m: ``vals[O, J]`` kept weights of output row o (n per group of m, J = in * n / m) and
  ``offs[O, J]`` uint8 positions inside their group: the input column of entry j is
  ``(j // n) * m + offs[o, j]``. One byte of index per kept value.

Inputs of batched calls arrive transposed, ``xt[in, batch]``, so the values a kept column
contributes to a tile of batch rows are contiguous and the update loops vectorise. Measured limit
(docs/runtime.md): numba keeps the accumulator tile in memory, not in registers (about 5 GFLOP/s
per thread against MKL's ~90 for dense sgemm), so batched products are slower than dense; the
batch-1 products are bandwidth-bound and beat dense.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_BATCH_TILE = 16


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _block_gemm(xt, cols, vals, out):  # pragma: no cover - compiled
    """Batch 1xN product: per block row and tile of batch rows, rank-1 updates of a [B, tile]
    accumulator (batch innermost and contiguous, so the update loop vectorises)."""
    rows, kept = cols.shape
    block = vals.shape[2]
    batch = xt.shape[1]
    for r in prange(rows):
        acc = np.empty((block, _BATCH_TILE), dtype=np.float32)
        for b0 in range(0, batch, _BATCH_TILE):
            nb = min(_BATCH_TILE, batch - b0)
            acc[:, :] = 0.0
            for k in range(kept):
                c = cols[r, k]
                for t in range(block):
                    w = vals[r, k, t]
                    for b in range(nb):
                        acc[t, b] += w * xt[c, b0 + b]
            for t in range(block):
                for b in range(nb):
                    out[r * block + t, b0 + b] = acc[t, b]


def _make_block_gemv(block: int):
    @njit(parallel=True, fastmath=True, cache=False, nogil=True)
    def kernel(x, cols, vals, out):  # pragma: no cover - compiled
        """Batch-1 1xN product: one weight vector per kept block, one input scalar."""
        rows, kept = cols.shape
        for r in prange(rows):
            acc = np.zeros(block, dtype=np.float32)
            for k in range(kept):
                xv = x[cols[r, k]]
                for t in range(block):
                    acc[t] += xv * vals[r, k, t]
            for t in range(block):
                out[r * block + t] = acc[t]

    return kernel


def _make_nm_gemv(n: int, m: int):
    @njit(parallel=True, fastmath=True, cache=False, nogil=True)
    def kernel(x, offs, vals, out):  # pragma: no cover - compiled
        """Batch-1 n:m product: per output row, a gather of the n kept inputs of every group of m."""
        rows, kept = offs.shape
        groups = kept // n
        for o in prange(rows):
            acc = np.float32(0.0)
            for g in range(groups):
                for q in range(n):
                    j = g * n + q
                    acc += vals[o, j] * x[g * m + offs[o, j]]
            out[o] = acc

    return kernel


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _nm_gemm(xt, offs, vals, n, m, out):  # pragma: no cover - compiled
    """n:m product for a batch: each kept weight scales one contiguous input row slice."""
    rows, kept = offs.shape
    groups = kept // n
    batch = xt.shape[1]
    for o in prange(rows):
        acc = np.zeros(batch, dtype=np.float32)
        for g in range(groups):
            base = g * m
            for q in range(n):
                j = g * n + q
                w = vals[o, j]
                c = base + offs[o, j]
                for b in range(batch):
                    acc[b] += w * xt[c, b]
        for b in range(batch):
            out[o, b] = acc[b]


_KERNELS: dict[tuple, object] = {}


def _kernel(key: tuple, make):
    """Kernels specialised on their small constants (block size, n, m) so loops unroll and vectorise."""
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = make(*key[1:])
    return kernel


def block_matmul_t(xt: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """``W @ xt`` for a 1xN-packed W and ``xt[in, batch]``; returns ``[out, batch]`` float32."""
    rows, _, block = vals.shape
    batch = xt.shape[1]
    if batch == 1:
        out = np.empty(rows * block, dtype=np.float32)
        _kernel(("block_gemv", block), _make_block_gemv)(np.ascontiguousarray(xt[:, 0]), cols, vals, out)
        return out.reshape(-1, 1)
    out = np.empty((rows * block, batch), dtype=np.float32)
    _block_gemm(np.ascontiguousarray(xt), cols, vals, out)
    return out


def nm_matmul_t(xt: np.ndarray, offs: np.ndarray, vals: np.ndarray, n: int, m: int) -> np.ndarray:
    """``W @ xt`` for an n:m-packed W and ``xt[in, batch]``; returns ``[out, batch]`` float32."""
    rows = offs.shape[0]
    batch = xt.shape[1]
    if batch == 1:
        out = np.empty(rows, dtype=np.float32)
        _kernel(("nm_gemv", n, m), _make_nm_gemv)(np.ascontiguousarray(xt[:, 0]), offs, vals, out)
        return out.reshape(-1, 1)
    out = np.empty((rows, batch), dtype=np.float32)
    _nm_gemm(np.ascontiguousarray(xt), offs, vals, n, m, out)
    return out
