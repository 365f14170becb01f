"""Compressed layouts of sparse weights: kept values plus compact indices.

A weight is first viewed as a GEMM matrix ``[out, columns]`` (:func:`gemm_matrix`): a Linear as is;
a Conv2d in PyTorch's (in, kh, kw) column order for 1xN blocks, or in (kh, kw, in) order for n:m
along input channels, so that every group of m is m consecutive columns.

* :class:`BlockPacked` (1xN): per block row of B output channels, the kept columns and their
  B-vectors. Rows with fewer kept columns than the longest row are padded with zero vectors (a
  uniform 1xN weight needs none).
* :class:`NMPacked` (n:m): per output row, n values and n uint8 in-group offsets per group of m.

Both unpack to the exact dense matrix (tested), and report their size in bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..pattern import BlockPattern, NMPattern, PatternError

__all__ = ["BlockPacked", "NMPacked", "pack_block", "pack_nm", "gemm_matrix", "FormatError"]


class FormatError(ValueError):
    """A weight does not have the pattern it is packed with."""


def gemm_matrix(weight: torch.Tensor, order: str) -> torch.Tensor:
    """``[out, columns]`` view of a Linear/Conv2d weight; ``order`` is ``"chw"`` or ``"hwc"``."""
    if weight.dim() == 2:
        return weight
    if order == "hwc":
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


@dataclass
class BlockPacked:
    cols: np.ndarray  # [R, K] int32
    vals: np.ndarray  # [R, K, B] float32
    shape: tuple[int, int]  # (out, columns)

    @property
    def block(self) -> int:
        return int(self.vals.shape[2])

    @functools.cached_property
    def cols_index(self) -> torch.Tensor:
        """``cols`` as an int64 tensor for ``index_select`` (built once, not per call)."""
        return torch.from_numpy(self.cols).long()

    @property
    def nbytes(self) -> int:
        return int(self.cols.nbytes + self.vals.nbytes)

    def dense(self) -> torch.Tensor:
        out, columns = self.shape
        rows, kept, block = self.vals.shape
        dense = np.zeros((rows, columns, block), dtype=np.float32)
        for k in range(kept):  # padded entries add zeros
            np.add.at(dense, (np.arange(rows), self.cols[:, k]), self.vals[:, k])
        return torch.from_numpy(dense.transpose(0, 2, 1).reshape(out, columns).copy())


@dataclass
class NMPacked:
    offs: np.ndarray  # [O, J] uint8
    vals: np.ndarray  # [O, J] float32
    n: int
    m: int
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.offs.nbytes + self.vals.nbytes)

    def dense(self) -> torch.Tensor:
        out, columns = self.shape
        j = np.arange(self.offs.shape[1])
        cols = (j // self.n) * self.m + self.offs.astype(np.int64)
        dense = np.zeros((out, columns), dtype=np.float32)
        np.put_along_axis(dense, cols, self.vals, axis=1)
        return torch.from_numpy(dense)


def pack_block(matrix: torch.Tensor, block: int) -> BlockPacked:
    """Pack a ``[out, columns]`` matrix of 1xN blocks (B = ``block`` output rows per block row)."""
    out, columns = matrix.shape
    if out % block:
        raise FormatError(f"block size {block} does not divide {out} output channels")
    w = matrix.detach().float().cpu().reshape(out // block, block, columns)  # [R, B, C]
    kept = w.ne(0).any(dim=1)  # [R, C]
    counts = kept.sum(1)
    width = max(1, int(counts.max()))
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :width]  # kept columns first, in order
    cols = order.to(torch.int32)
    vals = torch.gather(w.transpose(1, 2), 1, order.unsqueeze(-1).expand(-1, -1, block)).contiguous()  # [R, K, B]
    valid = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    vals = vals * valid.unsqueeze(-1)
    return BlockPacked(cols.numpy().copy(), vals.numpy().astype(np.float32).copy(), (out, columns))


def pack_nm(matrix: torch.Tensor, n: int, m: int) -> NMPacked:
    """Pack a ``[out, columns]`` matrix whose every group of m consecutive columns has <= n non-zeros."""
    out, columns = matrix.shape
    if columns % m or m > 256:
        raise FormatError(f"{columns} columns are not a multiple of m={m} (or m > 256)")
    groups = matrix.detach().float().cpu().reshape(out, columns // m, m)
    nonzero = groups.ne(0)
    if bool((nonzero.sum(-1) > n).any()):
        raise FormatError(f"the weight has groups with more than {n} non-zeros of {m}; it is not {n}:{m}")
    # the n non-zeros first (zeros fill the rest when a group has fewer), positions kept in order
    order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :n]
    offs = order.reshape(out, -1).to(torch.uint8)
    vals = torch.gather(groups, -1, order).reshape(out, -1)
    return NMPacked(offs.numpy().copy(), vals.numpy().astype(np.float32).copy(), n, m, (out, columns))


def check_pattern_fits(pattern: NMPattern | BlockPattern, shape: tuple[int, ...]) -> None:
    try:
        pattern.check_shape(shape)
    except PatternError as exc:
        raise FormatError(str(exc)) from None
