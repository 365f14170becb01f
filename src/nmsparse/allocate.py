r"""Per-layer sparsity budgets: uniform, ERK, and their rounding to n:m patterns.

A budget is a *global* density D over the selected layers (kept weights / all weights). An
allocator splits it into per-layer densities d_l with :math:`\sum_l d_l P_l = D \sum_l P_l`
(P_l the layer's parameter count), and :func:`nm_allocation` rounds those to n:m patterns with a
fixed m while keeping the global budget.

ERK (Erdos-Renyi-Kernel, Evci et al., "Rigging the Lottery", ICML 2020): a layer's density is
proportional to :math:`(\sum_i s_i / \prod_i s_i)^{power}` over its shape (out, in, kh, kw), so
small layers stay denser; layers that would exceed density 1 are made dense and the scale is solved
again over the rest, until every density is in [0, 1].

Schemes (``{fqn: "n:m"}``) are what a searched allocation (the ``usd`` method) writes; they load
back as a fixed allocation (``sparsity.allocation_file`` in a training config).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_file
from .pattern import NMPattern, PatternError, parse_pattern

__all__ = [
    "AllocationError",
    "uniform_densities",
    "erk_densities",
    "nm_allocation",
    "kept_params",
    "ERKAllocator",
    "save_scheme",
    "load_scheme",
    "power_of_two_candidates",
]

Shape = tuple[int, ...]


class AllocationError(ValueError):
    """A budget that cannot be met, or a scheme file that does not parse."""


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise AllocationError(f"density (fraction of weights kept) must be in (0, 1], got {density}")


def uniform_densities(shapes: Mapping[str, Shape], density: float) -> dict[str, float]:
    """Every layer at ``density``."""
    _check_density(density)
    return {fqn: float(density) for fqn in shapes}


def erk_densities(
    shapes: Mapping[str, Shape],
    density: float,
    power_scale: float = 1.0,
    include_kernel: bool = True,
    fixed: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """ERK per-layer densities meeting the global ``density`` over ``shapes``.

    Args:
        shapes: ``{fqn: weight shape}`` of the layers sharing the budget.
        density: global fraction of weights kept.
        power_scale: exponent of the ERK ratio (1 = RigL; 0 = uniform).
        include_kernel: count kernel dims in the ratio (ERK); False gives plain Erdos-Renyi.
        fixed: layers whose density is given (e.g. kept dense); the rest share what remains.

    Raises:
        AllocationError: the fixed layers alone exceed the budget, or a density is out of range.
    """
    _check_density(density)
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(shapes)
    if unknown:
        raise AllocationError(f"fixed densities name unknown layers: {', '.join(sorted(unknown))}")
    for fqn, d in fixed.items():
        if not 0.0 <= d <= 1.0:
            raise AllocationError(f"fixed density of {fqn} must be in [0, 1], got {d}")
    total = sum(_numel(s) for s in shapes.values())
    budget = density * total - sum(fixed[f] * _numel(shapes[f]) for f in fixed)
    free = [f for f in shapes if f not in fixed]
    free_params = sum(_numel(shapes[f]) for f in free)
    if budget < -1e-9 or budget > free_params + 1e-6:
        raise AllocationError(
            f"fixed layers use {density * total - budget:.0f} of the {density * total:.0f} kept weights the "
            f"budget allows; lower their densities or raise the global density"
        )

    def raw(shape: Shape) -> float:
        dims = shape if include_kernel else shape[:2]
        return (sum(dims) / math.prod(dims)) ** power_scale

    dense: set[str] = set()
    while True:
        rest = [f for f in free if f not in dense]
        rest_budget = budget - sum(_numel(shapes[f]) for f in dense)
        weighted = sum(raw(shapes[f]) * _numel(shapes[f]) for f in rest)
        if not rest or weighted <= 0:
            break
        eps = rest_budget / weighted
        over = [f for f in rest if eps * raw(shapes[f]) > 1.0]
        if not over:
            break
        dense.update(over)
    out: dict[str, float] = dict(fixed)
    for f in free:
        out[f] = 1.0 if f in dense else max(0.0, min(1.0, eps * raw(shapes[f])))
    return {f: out[f] for f in shapes}


def kept_params(shapes: Mapping[str, Shape], patterns: Mapping[str, NMPattern]) -> float:
    """Weights kept by ``patterns`` over ``shapes``."""
    return sum(_numel(shapes[f]) * patterns[f].density for f in shapes)


def power_of_two_candidates(m: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to m (m itself included): USD/DominoSearch's n candidates."""
    out, n = [], 1
    while n < m:
        out.append(n)
        n *= 2
    out.append(m)
    return tuple(out)


def nm_allocation(
    shapes: Mapping[str, Shape],
    densities: Mapping[str, float],
    m: int,
    candidates: tuple[int, ...] | None = None,
    axis: str = "in",
) -> dict[str, NMPattern]:
    """Round per-layer densities to ``n:m`` patterns (n from ``candidates``), keeping the global budget.

    Each layer first takes the largest candidate n with n/m <= its density (at least the smallest
    candidate); when those smallest candidates overshoot the budget, the layers furthest above their
    own density step down until it holds; then, while the budget has room, the layer whose rounding
    cost the most kept weights moves up one candidate if that does not overshoot. The result keeps
    at most the budget (unless every layer at its smallest candidate already exceeds it) and misses
    it by less than one candidate step of one layer.
    """
    cands = tuple(sorted(set(candidates or range(1, m + 1))))
    if not cands or cands[0] < 1 or cands[-1] > m:
        raise AllocationError(f"candidates must be integers in [1, {m}], got {candidates}")
    budget = sum(densities[f] * _numel(shapes[f]) for f in shapes)
    index = {}
    for f in shapes:
        fits = [i for i, n in enumerate(cands) if n / m <= densities[f] + 1e-12]
        index[f] = fits[-1] if fits else 0
    kept = sum(cands[index[f]] / m * _numel(shapes[f]) for f in shapes)
    while kept > budget + 1e-6:  # the smallest candidate overshot some layers: take it back elsewhere
        lowerable = [f for f in sorted(shapes) if index[f] > 0]
        if not lowerable:
            break
        f = max(lowerable, key=lambda g: cands[index[g]] / m - densities[g])
        kept -= (cands[index[f]] - cands[index[f] - 1]) / m * _numel(shapes[f])
        index[f] -= 1
    while True:
        best, best_gap = None, 0.0
        for f in sorted(shapes):
            i = index[f]
            if i + 1 >= len(cands):
                continue
            step = (cands[i + 1] - cands[i]) / m * _numel(shapes[f])
            gap = densities[f] * _numel(shapes[f]) - cands[i] / m * _numel(shapes[f])
            if kept + step <= budget + 1e-6 and gap > best_gap:
                best, best_gap = f, gap
        if best is None:
            break
        i = index[best]
        kept += (cands[i + 1] - cands[i]) / m * _numel(shapes[best])
        index[best] = i + 1
    return {f: NMPattern(cands[index[f]], m, axis) for f in shapes}  # type: ignore[arg-type]


@dataclass(frozen=True)
class ERKAllocator:
    """An allocation the Sparsifier computes on the layers it selects: ERK densities rounded to n:m.

    Args:
        sparsity: global fraction of weights removed over the selected layers.
        m: group size of every layer's pattern.
        candidates: allowed n (default: every 1..m).
        power_scale: ERK exponent.
        include_kernel: ERK (True) or Erdos-Renyi (False).
    """

    sparsity: float
    m: int
    candidates: tuple[int, ...] | None = None
    power_scale: float = 1.0
    include_kernel: bool = True

    def __call__(self, shapes: Mapping[str, Shape], axis: str = "in") -> dict[str, NMPattern]:
        densities = erk_densities(shapes, 1.0 - self.sparsity, self.power_scale, self.include_kernel)
        return nm_allocation(shapes, densities, self.m, self.candidates, axis)


def save_scheme(path: str | Path, patterns: Mapping[str, object]) -> None:
    """Write ``{fqn: "n:m"}`` as JSON, atomically."""
    data = {fqn: str(p) for fqn, p in sorted(patterns.items())}
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def load_scheme(path: str | Path) -> dict[str, str]:
    """Read a scheme written by :func:`save_scheme` (or by hand): ``{fqn: "n:m"}``.

    Raises:
        AllocationError: missing file, not JSON, or an entry that is not a pattern.
    """
    path = Path(path)
    if not path.is_file():
        raise AllocationError(f"scheme file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AllocationError(f"scheme file {str(path)!r} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise AllocationError(f"scheme file {str(path)!r} must hold an object {{fqn: 'n:m'}}")
    for fqn, spec in data.items():
        try:
            parse_pattern(spec)
        except PatternError as exc:
            raise AllocationError(f"scheme file {str(path)!r}, layer {fqn}: {exc}") from None
    return {str(k): str(v) for k, v in data.items()}
