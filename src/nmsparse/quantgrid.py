"""The integer grids of quantized weights and activations (pure tensor math, no layouts).

A weight group's grid: ``q = clamp(round(v / scale), lo, hi)``, ``value = q * scale``, the scale a
float16 value (stored exactly in two bytes; its magnitude rounded *up*).

* int8: symmetric, ``-127..127``, ``scale = max|v| / 127``.
* int4: all 16 levels ``-8..7``, as llama.cpp's Q4_0: the scale is signed, ``v* / -8`` for the group's
  value of largest magnitude ``v*`` (which lands on -8), times the clip ratio of :data:`INT4_CLIPS`
  that gives the group the least squared error (a smaller step for most values at the cost of
  clamping the largest: a few percent less error than the plain maximum on Gaussian-like groups).

Activations are quantized per block of columns with ``s = max|x| / 127``.
The runtime (:mod:`nmsparse.runtime.quant`) packs these grids into its layouts; one-shot methods
(SparseGPT's joint rounding) round onto them while pruning. Also here: :func:`nm_chunk`, the
kept values per chunk of an n:m layout, which decides how the runtime groups kept values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WeightScheme", "QuantError", "parse_weights", "qmax", "qrange", "fp16_up", "group_scales",
           "quantize_groups", "dequantize_groups", "quantize_activations", "nm_chunk", "INT4_CLIPS", "WEIGHT_CHOICES",
           "DEFAULT_GROUP", "GROUP_RANGE"]


def nm_chunk(columns: int, n: int, m: int) -> int:
    """Kept values per row and chunk of an n:m layout: the chunk spans at least 128 columns and 16
    kept values (one vector), and no more than the row."""
    groups = max(-(-128 // m), -(-16 // n))
    return min(groups * n, columns // m * n)


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
        scale = ("symmetric, float16 grid" if self.bits == 8 else
                 "signed, levels -8..7, clip ratio of least squared error, float16 grid")
        return {"weights": str(self), "bits": self.bits, "group": self.group, "scale": scale, "rounding": "nearest"}


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


INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)  # fractions of the int4 group maximum tried as its scale


def qmax(bits: int) -> int:
    """The largest magnitude a grid's integers reach: 127 (int8), 8 (int4)."""
    return 127 if bits == 8 else 8


def qrange(bits: int) -> tuple[int, int]:
    """The integers of a grid: ``(-127, 127)`` for int8, ``(-8, 7)`` for int4."""
    return (-127, 127) if bits == 8 else (-8, 7)


def fp16_up(scale: torch.Tensor) -> torch.Tensor:
    """The float16 value nearest each float32 scale whose magnitude is not smaller (sign kept), as
    float32."""
    mag = scale.abs()
    half = mag.to(torch.float16)
    low = half.float() < mag
    half = torch.where(low, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return torch.where(scale < 0, -half.float(), half.float())


def _round(grouped: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    return torch.clamp(torch.round(grouped / scales.unsqueeze(-1)), lo, hi)


def group_scales(grouped: torch.Tensor, bits: int) -> torch.Tensor:
    """The scale of each group ``grouped[..., L]`` (the grid of the module docstring): ``[...]``
    float32, nonzero (an all-zero group gets 1)."""
    if bits == 8:
        scales = fp16_up(grouped.abs().amax(-1) / 127)
        return torch.where(scales != 0, scales, torch.ones_like(scales))
    peak = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True)).squeeze(-1)  # v*, signed
    best, best_err = None, None
    for clip in INT4_CLIPS:
        scales = fp16_up(peak * (clip / -8.0))
        scales = torch.where(scales != 0, scales, torch.ones_like(scales))
        err = ((_round(grouped, scales, bits) * scales.unsqueeze(-1) - grouped) ** 2).sum(-1)
        if best is None:
            best, best_err = scales, err
        else:  # strictly better only: values already on the clip-1 grid keep it
            better = err < best_err
            best, best_err = torch.where(better, scales, best), torch.where(better, err, best_err)
    return best


def quantize_groups(values: torch.Tensor, bits: int, group: int, scales: torch.Tensor | None = None,
                    exact_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``values[S, L]`` (S segments) per group of ``group`` along the last axis.

    Returns ``(q[S, L] int8, scales[S, ceil(L / group)] float32)``; with ``scales`` given they are
    used as they are (values already on that grid come back exact). All-zero groups get scale 1.
    With ``exact_grid``, a group whose values already lie on another grid (``|v| <= k * |s|``, ``s`` a
    float16 value, every value an integer multiple of ``s`` in range: what SparseGPT's joint rounding
    leaves where a group's largest value shrank after its grid was set) keeps that grid, so it comes
    back exactly instead of being rounded again.
    """
    v = values.detach().float()
    segs, length = v.shape
    groups = -(-length // group)
    padded = torch.zeros(segs, groups * group)
    padded[:, :length] = v
    grouped = padded.view(segs, groups, group)
    scales = group_scales(grouped, bits) if scales is None else scales.float().reshape(segs, groups)
    qf = _round(grouped, scales, bits)
    if exact_grid:
        qf, scales = _keep_exact_grids(grouped, qf, scales, bits)
    q = qf.to(torch.int8)
    return q.view(segs, groups * group)[:, :length].contiguous(), scales.contiguous()


def _keep_exact_grids(grouped: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                      bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups ``q * scale`` does not reproduce, a grid ``±max|v| / k`` (float16 step, integers in
    range) that does, where one exists (see :func:`quantize_groups`); the finest such grid is taken."""
    q, scales = q.clone(), scales.clone()
    todo = ((q * scales.unsqueeze(-1)) != grouped).any(-1).nonzero(as_tuple=True)
    if not todo[0].numel():
        return q, scales
    lo, hi = qrange(bits)
    values = grouped[todo]  # [T, group]
    amax = values.abs().amax(-1)
    found = torch.zeros(values.shape[0], dtype=torch.bool)
    for k in range(qmax(bits), 0, -1):
        for sign in (1.0, -1.0):
            step = sign * amax / k
            cand = ~found & (step.half().float() == step) & (step != 0)
            if not bool(cand.any()):
                continue
            qk = torch.round(values[cand] / step[cand].unsqueeze(-1))
            exact = (qk * step[cand].unsqueeze(-1) == values[cand]).all(-1) & (qk >= lo).all(-1) & (qk <= hi).all(-1)
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
