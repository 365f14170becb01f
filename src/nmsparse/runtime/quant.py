"""Quantized weights of the runtime: kept values (or a dense weight) as 8- or 4-bit integers.

A :class:`WeightScheme` says how: ``bits`` (8 or 4) and ``group``, the number of consecutive
values along the input axis that share one scale. The grids (:mod:`nmsparse.quantgrid`): int8
symmetric, ``scale = max|v| / 127``; int4 all 16 levels -8..7 with a signed scale (Q4_0's rule, and
the clip ratio of least squared error); each scale a float16 value (so the compressed export stores
it exactly in two bytes), ``q = clamp(round(v / scale), lo, hi)``; the value the kernels compute with
is ``q * scale``. Values already on such a grid (an export pruned with ``--weights``) quantize back to
themselves: ``q * scale`` is exact in float32 for a float16 scale, and the grid is found again.
The grid math itself (schemes, group rounding, activations) lives in :mod:`nmsparse.quantgrid`,
below the methods that round onto it while pruning; it is re-exported here.

:class:`QPacked` is a quantized layout: the index structure of an n:m or 1xN layout
(:mod:`~nmsparse.runtime.formats`; its float32 values dropped) or none (``kind="dense"``), the
integers as bytes in the float32 layout's value order (``csrc/qkernels.h`` gives the byte and scale
order) and the scales as float16 (exactly the grid's values: half the bytes of float32 scales).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..quantgrid import (
    DEFAULT_GROUP,
    GROUP_RANGE,
    WEIGHT_CHOICES,
    QuantError,
    WeightScheme,
    dequantize_groups,
    fp16_up,
    parse_weights,
    qmax,
    quantize_activations,
    quantize_groups,
)
from .formats import BlockPacked, FormatError, NMPacked

__all__ = ["WeightScheme", "QPacked", "QuantError", "parse_weights", "quantize", "quantize_groups", "qmax",
           "dequantize_groups", "quantize_activations", "activation_block", "fp16_up", "WEIGHT_CHOICES",
           "DEFAULT_GROUP", "GROUP_RANGE"]

def _bytes(q: torch.Tensor, bits: int) -> np.ndarray:
    """The kernels' byte layout of int8 values (flat): as is (8 bits), or pairs of nibbles (4 bits,
    the first of a pair in the low nibble, stored as q + 8)."""
    flat = q.reshape(-1)
    if bits == 8:
        return flat.view(torch.uint8).numpy().copy()
    u = (flat.to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        raise FormatError("an int4 layout needs an even number of values")
    return (u[0::2] | (u[1::2] << 4)).numpy().copy()


def _unbytes(data: np.ndarray, bits: int, count: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(data))
    if bits == 8:
        return t.view(torch.int8)[:count].clone()
    lo, hi = (t & 15).to(torch.int16) - 8, (t >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=-1).reshape(-1)[:count].to(torch.int8)


def _half(scales: torch.Tensor) -> np.ndarray:
    """The scales (float16 values held in float32) as a flat float16 array; exact, else an error."""
    flat = scales.detach().float().reshape(-1)
    half = flat.half()
    if not torch.equal(half.float(), flat):
        raise QuantError("weight scales must be float16 values (nmsparse.quantgrid rounds them so); got "
                         f"{flat[half.float() != flat][0].item()!r}")
    return half.numpy().copy()


@dataclass
class QPacked:
    """A quantized layout. ``kind``: ``"nm"`` (``index`` an :class:`NMPacked` without values),
    ``"block"`` (a :class:`BlockPacked` without values) or ``"dense"`` (no index)."""

    kind: str
    index: NMPacked | BlockPacked | None
    q: np.ndarray  # uint8 bytes
    scales: np.ndarray  # float16, flat
    bits: int
    group: int
    shape: tuple[int, int]

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group)

    @property
    def values(self) -> int:
        """Number of stored values (kept values, or every weight for a dense layout)."""
        if self.kind == "dense":
            return self.shape[0] * self.shape[1]
        if self.kind == "nm":
            return self.shape[0] * self.index.kept
        rows, kept = self.index.cols.shape
        return rows * kept * self.shape[0] // rows

    @property
    def nbytes(self) -> int:
        index = 0
        if self.kind == "nm":
            index = self.index.codes.nbytes
        elif self.kind == "block":
            index = self.index.cols.nbytes
        return int(self.q.nbytes + self.scales.nbytes + index)

    def float_scales(self) -> torch.Tensor:
        """The scales as a flat float32 tensor."""
        return torch.from_numpy(self.scales).float()

    def int_values(self) -> torch.Tensor:
        """The integers, flat, in the float32 layout's value order (int8 tensor)."""
        return _unbytes(self.q, self.bits, self.values)

    def float_layout(self) -> NMPacked | BlockPacked | torch.Tensor:
        """The dequantized float32 layout: an :class:`NMPacked` / :class:`BlockPacked` with values
        ``q * scale``, or the dense ``[out, in]`` matrix."""
        flat = self.int_values().float()
        if self.kind == "dense":
            out, cols = self.shape
            return dequantize_groups(flat.view(out, cols), self.float_scales().view(out, -1), self.group)
        if self.kind == "block":
            rows, kept = self.index.cols.shape
            block = self.shape[0] // rows
            gk = -(-kept // self.group)
            s = self.float_scales().view(rows, gk, block).repeat_interleave(self.group, dim=1)[:, :kept]
            vals = (flat.view(rows, kept, block) * s).numpy()
            return BlockPacked(self.index.cols, vals, self.shape)
        vals = np.empty(flat.numel(), dtype=np.float32)
        scales = self.float_scales()
        at_v = at_s = 0
        for width in self.index._widths():
            n = self.shape[0] * width
            gr = -(-width // self.group)
            seg = dequantize_groups(flat[at_v: at_v + n].view(-1, width),
                                    scales[at_s: at_s + self.shape[0] * gr].view(-1, gr),
                                    self.group)
            vals[at_v: at_v + n] = seg.reshape(-1).numpy()
            at_v, at_s = at_v + n, at_s + self.shape[0] * gr
        return replace(self.index, vals=vals)

    def dense(self) -> torch.Tensor:
        """The ``[out, in]`` matrix the layout computes with (dequantized)."""
        layout = self.float_layout()
        return layout if isinstance(layout, torch.Tensor) else layout.dense()


def _check_int4(kind: str, layout: NMPacked | BlockPacked | None, shape: tuple[int, int]) -> str:
    """Why int4 cannot store this layout (every segment needs an even length), or ''."""
    if kind == "dense" and shape[1] % 2:
        return f"{shape[1]} input features are odd"
    if kind == "nm" and (layout.kept % 2 or layout.chunk % 2):
        return f"{layout.kept} kept values per row (chunks of {layout.chunk}) are not even"
    if kind == "block" and layout.block % 2:
        return f"block size {layout.block} is odd"
    return ""


def quantize(layout: NMPacked | BlockPacked | torch.Tensor, scheme: WeightScheme,
             scales: torch.Tensor | None = None, exact_grid: bool = False) -> QPacked:
    """Quantize a float32 layout (or a dense ``[out, in]`` matrix) with ``scheme``.

    ``scales`` (optional): the scales of the grid the values already lie on, shaped ``[out, ceil(in /
    group)]`` over the *dense* matrix's columns; only for dense matrices. ``exact_grid``: keep the
    grid of groups already on one (see :func:`quantize_groups`; an export pruned with ``--weights``).

    Raises:
        FormatError: int4 on a layout with an odd segment length (the caller keeps int8 or dense).
    """
    bits, group = scheme.bits, scheme.group
    if isinstance(layout, torch.Tensor):
        kind, index, shape = "dense", None, tuple(layout.shape)
    else:
        kind = "nm" if isinstance(layout, NMPacked) else "block"
        index, shape = layout, tuple(layout.shape)
    if bits == 4 and (why := _check_int4(kind, index, shape)):
        raise FormatError(f"int4 needs segments of even length: {why}")
    if kind == "dense":
        q, s = quantize_groups(layout.detach().float(), bits, group, scales, exact_grid)
        return QPacked(kind, None, _bytes(q, bits), _half(s), bits, group, shape)
    if kind == "block":
        rows, kept, block = layout.vals.shape
        v = torch.from_numpy(layout.vals).permute(0, 2, 1).reshape(rows * block, kept)  # segments along k
        q, s = quantize_groups(v, bits, group, exact_grid=exact_grid)
        q = q.view(rows, block, kept).permute(0, 2, 1).contiguous()
        s = s.view(rows, block, -1).permute(0, 2, 1).contiguous()  # [R, gk, B]
        empty = BlockPacked(layout.cols, np.zeros((rows, kept, 0), np.float32), shape)
        empty.kstart = layout.kstart
        return QPacked(kind, empty, _bytes(q, bits), _half(s), bits, group, shape)
    qs, ss, at = [], [], 0
    vals = torch.from_numpy(layout.vals)
    for width in layout._widths():  # chunk by chunk: segments of `width` values per row
        n = shape[0] * width
        q, s = quantize_groups(vals[at: at + n].view(shape[0], width), bits, group, exact_grid=exact_grid)
        qs.append(q.reshape(-1))
        ss.append(s.reshape(-1))
        at += n
    q = torch.cat(qs) if qs else torch.zeros(0, dtype=torch.int8)
    s = torch.cat(ss) if ss else torch.zeros(0)
    index = replace(layout, vals=np.zeros(0, np.float32))
    return QPacked(kind, index, _bytes(q, bits), _half(s), bits, group, shape)


def activation_block(packed: QPacked) -> int | None:
    """Columns per activation scale when ``packed``'s products quantize their inputs to int8: the
    columns of one weight scale group, ``min(group, chunk) * m / n`` for n:m and ``group`` for dense
    layouts; None where the groups do not line up with whole blocks of columns (1xN layouts, and n:m
    patterns whose chunk is not a multiple of the group), which keep float32 activations."""
    if packed.kind == "dense":
        return packed.group
    if packed.kind != "nm":
        return None
    n, m, jc = packed.index.n, packed.index.m, packed.index.chunk
    gm = min(packed.group, jc)
    if (gm * m) % n or jc % gm:
        return None
    return gm * m // n


