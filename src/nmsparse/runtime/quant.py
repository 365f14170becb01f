"""Quantized weights of the runtime: kept values (or a dense weight) as 8- or 4-bit integers.

A :class:`WeightScheme` says how: ``bits`` (8 or 4) and ``group``, the number of consecutive
values along the input axis that share one scale. Quantization is symmetric and round-to-nearest:
``scale = max|v| / qmax`` over the group (qmax 127 for int8, 7 for int4), rounded *up* to the
nearest float16 value (so the compressed export stores it exactly in two bytes), and
``q = clamp(round(v / scale), -qmax, qmax)``; the value the kernels compute with is ``q * scale``.
Values already on such a grid (an export pruned with ``--weights``) quantize back to themselves:
``q * scale`` is exact in float32 for a float16 scale, and the group's maximum gives the scale back.

:class:`QPacked` is a quantized layout: the index structure of an n:m or 1xN layout
(:mod:`~nmsparse.runtime.formats`; its float32 values dropped) or none (``kind="dense"``), the
integers as bytes in the float32 layout's value order (``csrc/qkernels.h`` gives the byte and scale
order) and the float32 scales.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .formats import BlockPacked, FormatError, NMPacked

__all__ = ["WeightScheme", "QPacked", "QuantError", "parse_weights", "quantize", "quantize_groups", "qmax",
           "dequantize_groups", "quantize_activations", "activation_block", "WEIGHT_CHOICES", "DEFAULT_GROUP"]

WEIGHT_CHOICES = ("fp32", "int8", "int4")
DEFAULT_GROUP = 64
GROUP_RANGE = (16, 512)


class QuantError(ValueError):
    """A weight scheme or group size that cannot be used (the message says what would work)."""


@dataclass(frozen=True)
class WeightScheme:
    """How weights are stored: ``bits`` 8 or 4, one scale per ``group`` values along the input axis."""

    bits: int
    group: int = DEFAULT_GROUP

    def __str__(self) -> str:
        return f"int{self.bits}"

    def as_dict(self) -> dict[str, object]:
        return {"weights": str(self), "bits": self.bits, "group": self.group, "scale": "symmetric, float16 grid",
                "rounding": "nearest"}


def parse_weights(text: str | None, group: int = DEFAULT_GROUP) -> WeightScheme | None:
    """``"fp32"`` (or None) -> None; ``"int8"`` / ``"int4"`` -> a :class:`WeightScheme`.

    Raises:
        QuantError: another value, or a group size outside 16..512 or not a multiple of 16.
    """
    if text is None or text == "fp32":
        return None
    if text not in WEIGHT_CHOICES:
        raise QuantError(f"weights {text!r} is not one of {', '.join(WEIGHT_CHOICES)}")
    if isinstance(group, bool) or not isinstance(group, int) or not (GROUP_RANGE[0] <= group <= GROUP_RANGE[1]) \
            or group % 16:
        raise QuantError(f"group size {group!r} must be a multiple of 16 from {GROUP_RANGE[0]} to {GROUP_RANGE[1]} "
                         "(e.g. 32, 64 or 128)")
    return WeightScheme(int(text[3:]), group)


def qmax(bits: int) -> int:
    return 127 if bits == 8 else 7


def _fp16_up(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= each float32 scale (returned as float32)."""
    half = scale.to(torch.float16)
    low = half.float() < scale
    half = torch.where(low, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half.float()


def quantize_groups(values: torch.Tensor, bits: int, group: int, scales: torch.Tensor | None = None,
                    exact_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``values[S, L]`` (S segments) per group of ``group`` along the last axis.

    Returns ``(q[S, L] int8, scales[S, ceil(L / group)] float32)``; with ``scales`` given they are
    used as they are (values already on that grid come back exact). All-zero groups get scale 1.
    With ``exact_grid``, a group whose values already lie on a grid whose largest step count is
    below qmax (``max|v| = k * s``, ``s`` a float16 value, every value a multiple of ``s``: what
    SparseGPT's joint rounding leaves where a group's largest value shrank) keeps that grid, so it
    comes back exactly instead of being rounded again.
    """
    v = values.detach().float()
    segs, length = v.shape
    groups = -(-length // group)
    padded = torch.zeros(segs, groups * group)
    padded[:, :length] = v
    grouped = padded.view(segs, groups, group)
    if scales is None:
        amax = grouped.abs().amax(-1)
        scales = _fp16_up(amax / qmax(bits))
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    scales = scales.float().reshape(segs, groups)
    qf = torch.clamp(torch.round(grouped / scales.unsqueeze(-1)), -qmax(bits), qmax(bits))
    if exact_grid:
        qf, scales = _keep_exact_grids(grouped, qf, scales, bits)
    q = qf.to(torch.int8)
    return q.view(segs, groups * group)[:, :length].contiguous(), scales.contiguous()


def _keep_exact_grids(grouped: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                      bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups ``q * scale`` does not reproduce, the coarsest grid ``max|v| / k`` (k < qmax, float16
    step) that does, where one exists (see :func:`quantize_groups`)."""
    q, scales = q.clone(), scales.clone()
    todo = ((q * scales.unsqueeze(-1)) != grouped).any(-1).nonzero(as_tuple=True)
    if not todo[0].numel():
        return q, scales
    values = grouped[todo]  # [T, group]
    amax = values.abs().amax(-1)
    found = torch.zeros(values.shape[0], dtype=torch.bool)
    for k in range(qmax(bits) - 1, 0, -1):
        step = amax / k
        cand = ~found & (step.half().float() == step) & (step > 0)
        if not bool(cand.any()):
            continue
        qk = torch.round(values[cand] / step[cand].unsqueeze(-1))
        exact = (qk * step[cand].unsqueeze(-1) == values[cand]).all(-1)
        rows = cand.nonzero(as_tuple=True)[0][exact]
        if rows.numel():
            index = tuple(t[rows] for t in todo)
            q[index] = qk[exact]
            scales[index] = step[rows]
            found[rows] = True
        if bool(found.all()):
            break
    return q, scales


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``q[S, L] * scales[S, ceil(L / group)]`` expanded along the groups (float32)."""
    return q.float() * scales.repeat_interleave(group, dim=-1)[:, : q.shape[-1]]


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


@dataclass
class QPacked:
    """A quantized layout. ``kind``: ``"nm"`` (``index`` an :class:`NMPacked` without values),
    ``"block"`` (a :class:`BlockPacked` without values) or ``"dense"`` (no index)."""

    kind: str
    index: NMPacked | BlockPacked | None
    q: np.ndarray  # uint8 bytes
    scales: np.ndarray  # float32, flat
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

    def int_values(self) -> torch.Tensor:
        """The integers, flat, in the float32 layout's value order (int8 tensor)."""
        return _unbytes(self.q, self.bits, self.values)

    def float_layout(self) -> NMPacked | BlockPacked | torch.Tensor:
        """The dequantized float32 layout: an :class:`NMPacked` / :class:`BlockPacked` with values
        ``q * scale``, or the dense ``[out, in]`` matrix."""
        flat = self.int_values().float()
        if self.kind == "dense":
            out, cols = self.shape
            return dequantize_groups(flat.view(out, cols), torch.from_numpy(self.scales).view(out, -1), self.group)
        if self.kind == "block":
            rows, kept = self.index.cols.shape
            block = self.shape[0] // rows
            gk = -(-kept // self.group)
            s = torch.from_numpy(self.scales).view(rows, gk, block).repeat_interleave(self.group, dim=1)[:, :kept]
            vals = (flat.view(rows, kept, block) * s).numpy()
            return BlockPacked(self.index.cols, vals, self.shape)
        vals = np.empty(flat.numel(), dtype=np.float32)
        at_v = at_s = 0
        for width in self.index._widths():
            n = self.shape[0] * width
            gr = -(-width // self.group)
            seg = dequantize_groups(flat[at_v: at_v + n].view(-1, width),
                                    torch.from_numpy(self.scales[at_s: at_s + self.shape[0] * gr]).view(-1, gr),
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
        return QPacked(kind, None, _bytes(q, bits), s.reshape(-1).numpy().copy(), bits, group, shape)
    if kind == "block":
        rows, kept, block = layout.vals.shape
        v = torch.from_numpy(layout.vals).permute(0, 2, 1).reshape(rows * block, kept)  # segments along k
        q, s = quantize_groups(v, bits, group, exact_grid=exact_grid)
        q = q.view(rows, block, kept).permute(0, 2, 1).contiguous()
        s = s.view(rows, block, -1).permute(0, 2, 1).contiguous()  # [R, gk, B]
        empty = BlockPacked(layout.cols, np.zeros((rows, kept, 0), np.float32), shape)
        empty.kstart = layout.kstart
        return QPacked(kind, empty, _bytes(q, bits), s.reshape(-1).numpy().copy(), bits, group, shape)
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
    return QPacked(kind, index, _bytes(q, bits), s.numpy().copy(), bits, group, shape)


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


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """What the int8-activation products multiply with: each row of ``x[..., columns]`` cut into
    blocks of ``block`` columns, ``s = max|x| / 127`` per block, ``q = round-half-even(x * (127 / max|x|))``
    (0 for an all-zero block), returned as ``s * q`` in float32 (the kernels' ``quant_x``, bit for bit)."""
    x = x.float()
    cols = x.shape[-1]
    blocks = -(-cols // block)
    padded = torch.zeros(*x.shape[:-1], blocks * block)
    padded[..., :cols] = x
    grouped = padded.view(*x.shape[:-1], blocks, block)
    amax = grouped.abs().amax(-1, keepdim=True)
    s = amax / 127.0
    # tensor / tensor: a Python number over a tensor is computed as reciprocal() * number, another rounding
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    q = torch.round(grouped * inv)
    return (s * q).view(*x.shape[:-1], blocks * block)[..., :cols]
