"""Sparsity patterns: what structure a sparse weight must have.

Two kinds of pattern exist:

* :class:`NMPattern` -- keep ``n`` of every ``m`` consecutive weights along one axis ("2:4" keeps
  2 of every 4). **n counts the weights KEPT**, as SR-STE and the seed systems write it. Wanda,
  SparseGPT and Intel Neural Compressor write the number *pruned* first ("2:4" there also means
  half pruned, but "1:4" there means 3 kept); nmsparse always means kept.
* :class:`BlockPattern` -- 1xN blocks (SUBP): ``block`` consecutive output channels x 1 input
  channel x the whole kernel form one block, and every block row keeps the same number of blocks,
  a fraction ``density`` of the input channels. Text form ``"1x16:0.25"``: blocks of 16 output
  channels, 25% of blocks kept. As for n:m, the number after the colon is what is kept.

The *axis* says along which dimension a group of m runs:

* ``"in"`` (default): along input features / input channels. For a conv weight
  ``[out, in, kh, kw]`` a group is m input channels at one ``(out, kh, kw)`` position -- the order
  channels-last sparse kernels consume (NVIDIA ASP, cuSPARSELt).
* ``"out"``: along output channels, at one ``(in, kh, kw)`` position.
* ``"flat"``: along the flattened ``(in, kh, kw)`` order of each output row, as an im2col GEMM
  sees it (SR-STE's original layout). Equals ``"in"`` for Linear and 1x1 convs. With ``+pad``
  (``"2:4@flat+pad"``) a row whose length is not a multiple of m is padded with zeros at its end,
  so its last group spans the padding (e.g. the 3x7x7 = 147 columns of a ResNet stem become 148),
  as an im2col GEMM with a padded K dimension would hold it.

This module is pure: no tensors are touched here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Axis = Literal["in", "out", "flat"]
AXES: tuple[str, ...] = ("in", "out", "flat")


class PatternError(ValueError):
    """A pattern spec is invalid, or does not fit the weight it is applied to."""


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along ``axis``.

    Args:
        n: weights kept per group, ``1 <= n <= m``.
        m: group size, ``m >= 1``.
        axis: ``"in"``, ``"out"`` or ``"flat"`` (see module docstring).

    Raises:
        PatternError: if n or m is out of range or the axis is unknown.
    """

    n: int
    m: int
    axis: Axis = "in"
    pad: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or not isinstance(self.m, int) or isinstance(self.n, bool):
            raise PatternError(f"n and m must be integers, got n={self.n!r}, m={self.m!r}")
        if self.m < 1:
            raise PatternError(f"m must be >= 1, got {self.m} (write patterns as 'n:m', e.g. '2:4')")
        if not 1 <= self.n <= self.m:
            raise PatternError(
                f"n must satisfy 1 <= n <= m (n counts weights KEPT per group), got '{self.n}:{self.m}'"
            )
        if self.axis not in AXES:
            raise PatternError(f"axis must be one of {', '.join(AXES)}; got {self.axis!r}")
        if self.pad and self.axis != "flat":
            raise PatternError(f"'+pad' applies to the flat (im2col) axis only: write '{self.n}:{self.m}@flat+pad'")

    @property
    def density(self) -> float:
        """Fraction of weights kept, n / m."""
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def is_dense(self) -> bool:
        return self.n == self.m

    def with_axis(self, axis: Axis) -> NMPattern:
        return NMPattern(self.n, self.m, axis, self.pad and axis == "flat")

    def __str__(self) -> str:
        text = f"{self.n}:{self.m}" if self.axis == "in" else f"{self.n}:{self.m}@{self.axis}"
        return text + ("+pad" if self.pad else "")

    def group_width(self, shape: tuple[int, ...]) -> int:
        """Length of the dimension the groups run along, for a weight of ``shape``."""
        _check_weight_shape(shape)
        if self.axis == "in":
            return shape[1]
        if self.axis == "out":
            return shape[0]
        width = 1
        for d in shape[1:]:
            width *= d
        return width

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`PatternError` unless the grouped width of ``shape`` is a multiple of m."""
        width = self.group_width(shape)
        if width % self.m and not self.pad:
            raise PatternError(
                f"grouped width {width} (axis '{self.axis}' of shape {list(shape)}) is not a multiple "
                f"of m={self.m}; use an m that divides {width}, another axis, or pad the im2col rows "
                f"('{self.n}:{self.m}@flat+pad')"
            )


@dataclass(frozen=True)
class BlockPattern:
    """1xN blocks: ``block`` consecutive output channels x 1 input channel x the whole kernel.

    Every block row (``block`` output channels) keeps the same number of blocks,
    ``kept_per_row(C) = max(1, C - int((1 - density) * C))``: SUBP prunes ``int(p * C)`` blocks of
    each row at prune rate p = 1 - density, the float product truncated as its code computes it, so
    a half kept on 5 channels keeps 3 (Python's half-to-even ``round`` would keep 2) and p = 0.7 on
    90 channels keeps 28 (0.7 * 90 is 62.99999999999999 in floating point). Threads that own block
    rows get equal work (SUBP, Xiang et al., NeurIPS 2023).

    Args:
        block: output channels per block (SUBP uses 4, 8, 16, 32).
        density: fraction of blocks kept in each block row, in (0, 1].
    """

    block: int
    density: float

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise PatternError(f"block size must be a positive integer, got {self.block!r} (e.g. '1x16:0.25')")
        if not (0.0 < float(self.density) <= 1.0):
            raise PatternError(
                f"block density (fraction of blocks KEPT) must be in (0, 1], got {self.density!r}; "
                "'1x16:0.25' keeps a quarter of the blocks (75% sparsity)"
            )

    axis = "out"  # blocks run along output channels; kept for a uniform interface

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def is_dense(self) -> bool:
        return self.density >= 1.0

    def kept_per_row(self, in_channels: int) -> int:
        pruned = int((1.0 - self.density) * in_channels)  # SUBP's int(prune_rate * in_channels), as it rounds
        return max(1, min(in_channels, in_channels - pruned))

    def __str__(self) -> str:
        return f"1x{self.block}:{self.density:g}"

    def check_shape(self, shape: tuple[int, ...]) -> None:
        _check_weight_shape(shape)
        if shape[0] % self.block:
            raise PatternError(
                f"block size {self.block} does not divide the {shape[0]} output channels of shape "
                f"{list(shape)}; use a block size that divides {shape[0]}"
            )


Pattern = NMPattern | BlockPattern

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:@\s*(\w+))?\s*(\+\s*pad)?\s*$")
_BLOCK_RE = re.compile(r"^\s*1\s*[xX]\s*(\d+)\s*:\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*$")


def parse_pattern(spec: str | Pattern, axis: Axis | None = None) -> Pattern:
    """Parse ``"2:4"``, ``"1:8@out"`` or ``"1x16:0.25"`` into a pattern.

    Args:
        spec: text form, or an already-built pattern (returned as is, with ``axis`` applied).
        axis: overrides the axis of an n:m pattern.

    Raises:
        PatternError: for text that is neither ``n:m[@axis]`` nor ``1xN:density``.
    """
    if isinstance(spec, NMPattern):
        return spec.with_axis(axis) if axis else spec
    if isinstance(spec, BlockPattern):
        return spec
    if not isinstance(spec, str):
        raise PatternError(f"a pattern must be text like '2:4' or '1x16:0.25', got {type(spec).__name__}")
    match = _NM_RE.match(spec)
    if match:
        n, m, text_axis = int(match.group(1)), int(match.group(2)), match.group(3)
        return NMPattern(n, m, axis or text_axis or "in", bool(match.group(4)))  # type: ignore[arg-type]
    match = _BLOCK_RE.match(spec)
    if match:
        return BlockPattern(int(match.group(1)), float(match.group(2)))
    raise PatternError(
        f"cannot parse pattern {spec!r}: expected 'n:m' with n kept of every m (e.g. '2:4', '1:8', "
        "'2:4@out') or '1xN:density' for 1xN blocks (e.g. '1x16:0.25')"
    )


def _check_weight_shape(shape: tuple[int, ...]) -> None:
    if len(shape) < 2:
        raise PatternError(f"patterns apply to weights with >= 2 dims ([out, in, ...]), got shape {list(shape)}")
