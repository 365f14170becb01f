"""Compressed layouts of sparse weights: kept values plus compact indices.

A weight is first viewed as a GEMM matrix ``[out, columns]`` (:func:`gemm_matrix`): a Linear as is;
a Conv2d in PyTorch's (in, kh, kw) column order for 1xN blocks, or in (kh, kw, in) order for n:m
along input channels, so that every group of m is m consecutive columns.

* :class:`BlockPacked` (1xN): per block row of B output channels, the kept columns and their
  B-vectors. Rows with fewer kept columns than the longest row are padded with zero vectors (a
  uniform 1xN weight needs none).
* :class:`NMPacked` (n:m): per output row, n values per group of m and their in-group offsets,
  ``bits`` = ceil(log2 m) (rounded to 1, 2, 4 or 8) each, bit-packed. Stored chunk-major: the columns
  are cut into chunks of about 128 (:func:`nm_chunk`), and for every chunk the kept values of all
  rows follow each other (flat arrays, the last chunk narrower), so a batched product reads the
  weights as one stream while a chunk's inputs stay in L1 (``csrc/kernels.cpp``). A 2:4 weight
  costs 4 bytes + 2 bits per kept value.

Both unpack to the exact dense matrix (tested), and report their size in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..quantgrid import nm_chunk

__all__ = ["BlockPacked", "NMPacked", "pack_block", "pack_nm", "gemm_matrix", "FormatError", "offset_bits",
           "pack_bits", "unpack_bits"]


class FormatError(ValueError):
    """A weight does not have the pattern it is packed with."""


def gemm_matrix(weight: torch.Tensor, order: str) -> torch.Tensor:
    """``[out, columns]`` view of a Linear/Conv2d weight; ``order`` is ``"chw"`` or ``"hwc"``."""
    if weight.dim() == 2:
        return weight
    if order == "hwc":
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)



BLOCK_CHUNK_COLS = 128  # columns per chunk of the batched 1xN kernel: 128 input rows x 64 batch = 32 KB of L1


@dataclass
class BlockPacked:
    cols: np.ndarray  # [R, K] int32
    vals: np.ndarray  # [R, K, B] float32
    shape: tuple[int, int]  # (out, columns)

    @property
    def block(self) -> int:
        return int(self.vals.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.cols.nbytes + self.vals.nbytes)

    def __post_init__(self) -> None:
        # built with the layout, not at the first call: a first call should cost what every call costs
        self.kstart = self._chunk_starts()

    def _chunk_starts(self) -> np.ndarray:
        """``[R, C + 1]`` int32: the first kept entry of each block row in each chunk of
        :data:`BLOCK_CHUNK_COLS` columns (the batched C++ kernel walks the columns chunk by chunk).
        Kept columns ascend; a padded tail (zero values) counts to the last chunk."""
        rows, kept = self.cols.shape
        chunks = max(1, -(-self.shape[1] // BLOCK_CHUNK_COLS))
        bounds = np.arange(chunks) * BLOCK_CHUNK_COLS
        out = np.empty((rows, chunks + 1), dtype=np.int32)
        for r in range(rows):
            row = self.cols[r]
            drops = np.flatnonzero(np.diff(row) < 0)
            prefix = row[: drops[0] + 1] if drops.size else row
            out[r, :chunks] = np.searchsorted(prefix, bounds, side="left")
            out[r, chunks] = kept
        out[:, 0] = 0
        return out

    def refresh(self) -> None:
        """Rebuild what is derived from the arrays after they changed in place (a new mask loaded
        into them): the chunk starts."""
        self.kstart = self._chunk_starts()

    def dense(self) -> torch.Tensor:
        out, columns = self.shape
        rows, kept, block = self.vals.shape
        dense = np.zeros((rows, columns, block), dtype=np.float32)
        for k in range(kept):  # padded entries add zeros
            np.add.at(dense, (np.arange(rows), self.cols[:, k]), self.vals[:, k])
        return torch.from_numpy(dense.transpose(0, 2, 1).reshape(out, columns).copy())


def offset_bits(m: int) -> int:
    """Bits per n:m offset: ceil(log2 m) rounded up to 1, 2, 4 or 8."""
    need = max(1, (m - 1).bit_length())
    return next(b for b in (1, 2, 4, 8) if b >= need)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack small unsigned integers (< 2**bits) along the last axis into bytes, 8 / bits per byte,
    the first value in the lowest bits; the last axis is zero-padded to whole bytes."""
    per = 8 // bits
    values = values.astype(np.uint8)
    lead, count = values.shape[:-1], values.shape[-1]
    padded = np.zeros((*lead, -(-count // per) * per), dtype=np.uint8)
    padded[..., :count] = values
    lanes = padded.reshape(*lead, -1, per).astype(np.uint16) << (np.arange(per, dtype=np.uint16) * bits)
    return lanes.sum(axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` values along the last axis."""
    per = 8 // bits
    lanes = (packed[..., None].astype(np.uint16) >> (np.arange(per, dtype=np.uint16) * bits)) & ((1 << bits) - 1)
    return lanes.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


@dataclass
class NMPacked:
    codes: np.ndarray  # flat uint8: bit-packed offsets, chunk-major (see the module docstring)
    vals: np.ndarray  # flat float32: kept values, chunk-major
    n: int
    m: int
    shape: tuple[int, int]

    @property
    def bits(self) -> int:
        return offset_bits(self.m)

    @property
    def chunk(self) -> int:
        """Kept values per row and chunk (``jc``; the last chunk may hold fewer)."""
        return nm_chunk(self.shape[1], self.n, self.m)

    @property
    def kept(self) -> int:
        """Kept values per row (``J``)."""
        return self.shape[1] // self.m * self.n

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.vals.nbytes)

    def _widths(self) -> list[int]:
        jc, kept = self.chunk, self.kept
        return [min(jc, kept - c) for c in range(0, kept, jc)]

    def row_major(self) -> tuple[np.ndarray, np.ndarray]:
        """``(offs[O, J] uint8, vals[O, J] float32)``: per row, the kept values in column order."""
        out = self.shape[0]
        offs, vals, at_v, at_c = [], [], 0, 0
        for width in self._widths():
            cbytes = -(-width * self.bits // 8)
            vals.append(self.vals[at_v: at_v + out * width].reshape(out, width))
            offs.append(unpack_bits(self.codes[at_c: at_c + out * cbytes].reshape(out, cbytes), self.bits, width))
            at_v, at_c = at_v + out * width, at_c + out * cbytes
        return np.ascontiguousarray(np.concatenate(offs, axis=1)), np.ascontiguousarray(np.concatenate(vals, axis=1))

    def refresh(self) -> None:
        """Nothing is derived from an n:m layout's arrays (the BlockPacked counterpart rebuilds chunk starts)."""

    def dense(self) -> torch.Tensor:
        out, columns = self.shape
        offs, vals = self.row_major()
        j = np.arange(offs.shape[1])
        cols = (j // self.n) * self.m + offs.astype(np.int64)
        dense = np.zeros((out, columns), dtype=np.float32)
        np.put_along_axis(dense, cols, vals, axis=1)
        return torch.from_numpy(dense)

    @classmethod
    def from_row_major(cls, offs: np.ndarray, vals: np.ndarray, n: int, m: int, shape: tuple[int, int]) -> NMPacked:
        out, columns = shape
        packed = cls(np.zeros(0, np.uint8), np.zeros(0, np.float32), n, m, (out, columns))
        codes_parts, vals_parts, at = [], [], 0
        for width in packed._widths():
            vals_parts.append(np.ascontiguousarray(vals[:, at: at + width], dtype=np.float32).ravel())
            codes_parts.append(pack_bits(offs[:, at: at + width], packed.bits).ravel())
            at += width
        packed.codes = np.concatenate(codes_parts) if codes_parts else packed.codes
        packed.vals = np.concatenate(vals_parts) if vals_parts else packed.vals
        return packed


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
    return NMPacked.from_row_major(offs.numpy(), vals.numpy(), n, m, (out, columns))

