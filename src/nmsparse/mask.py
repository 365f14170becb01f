"""Masks from scores: pure functions of tensors. True in a mask means the weight is KEPT.

Tie rule (deterministic): within a group, higher scores are kept first; among equal scores the
weight with the lower index inside the group is kept. NaN scores count as the lowest score.

Layouts (see :mod:`nmsparse.pattern` for the axes): :func:`to_groups` views a weight as rows of m
candidates ``[G, m]`` and :func:`from_groups` is its exact inverse.
"""

from __future__ import annotations

import torch

from .pattern import BlockPattern, NMPattern, Pattern, PatternError

__all__ = [
    "to_groups",
    "from_groups",
    "topk_groups",
    "nm_mask",
    "block_mask",
    "block_scores",
    "compute_mask",
    "group_counts",
    "is_nm",
    "block_row_counts",
    "is_block_uniform",
    "satisfies",
    "sliced_mask",
    "sliced_satisfies",
]


def _moved_axis(pattern: NMPattern) -> int | None:
    return {"in": 1, "out": 0, "flat": None}[pattern.axis]


def to_groups(tensor: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """View ``tensor`` as ``[G, m]`` groups along the pattern's axis (a copy when a permute is needed).

    Raises:
        PatternError: if the grouped width is not a multiple of m.
    """
    pattern.check_shape(tuple(tensor.shape))
    axis = _moved_axis(pattern)
    if axis is None:  # flat: each output row in PyTorch (in, kh, kw) order
        rows = tensor.reshape(tensor.shape[0], -1)
        extra = -rows.shape[1] % pattern.m
        if extra:  # '+pad': zeros at the end of every row
            rows = torch.nn.functional.pad(rows, (0, extra))
        return rows.reshape(-1, pattern.m)
    # e.g. conv [out, in, kh, kw] -> [out, kh, kw, in] -> [G, m]
    return tensor.movedim(axis, -1).reshape(-1, pattern.m)


def from_groups(groups: torch.Tensor, shape: tuple[int, ...] | torch.Size, pattern: NMPattern) -> torch.Tensor:
    """Inverse of :func:`to_groups` for a weight of ``shape``."""
    axis = _moved_axis(pattern)
    if axis is None:
        width = 1
        for d in shape[1:]:
            width *= d
        return groups.reshape(shape[0], -1)[:, :width].reshape(shape)
    moved = list(shape)
    moved.append(moved.pop(axis))  # shape after movedim(axis, -1)
    return groups.reshape(moved).movedim(-1, axis)


def topk_groups(scores: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """Bool mask of the top ``k`` entries of each row of ``scores`` ``[G, m]`` (tie rule above).

    With ``absolute`` the ranking uses ``|scores|`` (magnitude pruning without an extra copy).

    CPU tensors go through a fused numba kernel when numba is installed; other devices (and CPUs
    without numba) use the torch implementation. Both give identical masks.
    """
    if k >= scores.shape[1]:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.device.type == "cpu" and scores.shape[1] <= 64:
        from . import _topk_cpu

        if _topk_cpu.available():
            return _topk_cpu.topk_rows(scores, k, absolute)
    return _topk_torch(scores.abs() if absolute else scores, k)


def _topk_torch(scores: torch.Tensor, k: int) -> torch.Tensor:
    rows, m = scores.shape
    if k >= m:
        return torch.ones_like(scores, dtype=torch.bool)
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    if m <= 8:
        # Rank by pairwise comparison: rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}.
        s_i = scores.unsqueeze(2)  # [G, m, 1]
        s_j = scores.unsqueeze(1)  # [G, 1, m]
        earlier = torch.ones(m, m, dtype=torch.bool, device=scores.device).tril(-1)  # [i, j]: j < i
        beats = (s_j > s_i) | ((s_j == s_i) & earlier)
        return beats.sum(dim=2) < k
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    mask = torch.zeros(rows, m, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :k], True)
    return mask


def nm_mask(scores: torch.Tensor, pattern: NMPattern, absolute: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep exactly ``pattern.n`` of every ``pattern.m`` scores along the pattern's axis.

    Args:
        scores: importance, shaped like the weight (``[out, in]`` or ``[out, in, kh, kw]``).
        pattern: the n:m pattern.
        absolute: rank by ``|scores|`` (pass a raw weight for magnitude pruning).
        out: write the mask here as 1/0 instead (a tensor shaped like ``scores``, any float dtype;
            a contiguous float32 CPU tensor is filled by the kernel in the same pass).

    Returns:
        Bool mask shaped like ``scores`` (or ``out``); every group holds exactly n kept values.

    Raises:
        PatternError: if the grouped width is not a multiple of m.
    """
    pattern.check_shape(tuple(scores.shape))
    if scores.device.type == "cpu" and pattern.m <= 64 and not pattern.pad:
        from . import _topk_cpu

        if _topk_cpu.supports(pattern.m, out):
            # fused kernel on the weight's own layout, no permuted copies
            return _topk_cpu.topk_strided(scores, *_strided_view(scores.shape, pattern), pattern.m, pattern.n, absolute,
                                          out=out)
    groups = to_groups(scores, pattern)
    return _into(from_groups(topk_groups(groups, pattern.n, absolute), scores.shape, pattern).contiguous(), out)


def _into(mask: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``mask`` itself, or copied into ``out`` (as 1/0) and ``out`` returned."""
    if out is None:
        return mask
    if out.shape != mask.shape:
        raise ValueError(f"out has shape {list(out.shape)}; the mask has shape {list(mask.shape)}")
    return out.copy_(mask)


def _strided_view(shape: tuple[int, ...] | torch.Size, pattern: NMPattern) -> tuple[int, int, int]:
    """(outer, width, inner) such that groups run along ``width`` of a contiguous [outer, width, inner] view."""
    inner_dims = 1
    for d in shape[2:]:
        inner_dims *= d
    if pattern.axis == "in":
        return shape[0], shape[1], inner_dims
    if pattern.axis == "out":
        return 1, shape[0], shape[1] * inner_dims
    return shape[0], shape[1] * inner_dims, 1


def block_scores(weight: torch.Tensor, block: int, norm: str = "l1") -> torch.Tensor:
    """Per-block importance ``[out / block, in]`` of 1xN blocks (block output channels x 1 input x kernel).

    Args:
        weight: ``[out, in]`` or ``[out, in, kh, kw]``.
        block: output channels per block.
        norm: ``"l1"`` (sum of |w|) or ``"l2"`` (Euclidean norm) over each block.
    """
    BlockPattern(block, 1.0).check_shape(tuple(weight.shape))
    out, inp = weight.shape[:2]
    blocks = weight.reshape(out // block, block, inp, -1)  # [rows, block, in, kh*kw]
    if norm == "l1":
        return blocks.abs().sum(dim=(1, 3))
    if norm == "l2":
        return blocks.float().pow(2).sum(dim=(1, 3)).sqrt()
    raise ValueError(f"block norm must be 'l1' or 'l2', got {norm!r}")


def expand_block_mask(row_mask: torch.Tensor, shape: tuple[int, ...] | torch.Size, block: int) -> torch.Tensor:
    """Expand a ``[out / block, in]`` block mask to the full weight ``shape``."""
    full = row_mask.repeat_interleave(block, dim=0)  # [out, in]
    return full.reshape(full.shape + (1,) * (len(shape) - 2)).expand(shape).contiguous()


def block_mask(scores: torch.Tensor, pattern: BlockPattern, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Keep the same number of top-scoring blocks in every block row.

    Args:
        scores: ``[out / block, in]`` block scores (see :func:`block_scores`).
        pattern: the 1xN pattern; each row keeps ``pattern.kept_per_row(in)`` blocks.
        shape: full weight shape the mask is expanded to.
    """
    pattern.check_shape(tuple(shape))
    keep = pattern.kept_per_row(scores.shape[1])
    return expand_block_mask(topk_groups(scores, keep), shape, pattern.block)


def compute_mask(scores: torch.Tensor, pattern: Pattern, absolute: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Mask for either kind of pattern; ``scores`` is shaped like the weight (``out``: see :func:`nm_mask`).

    For a :class:`BlockPattern` the per-weight scores are summed over each block (L1 when they are
    magnitudes).
    """
    if isinstance(pattern, NMPattern):
        return nm_mask(scores, pattern, absolute, out=out)
    return _into(block_mask(block_scores(scores, pattern.block), pattern, scores.shape), out)  # L1 of |scores|


def group_counts(tensor: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Number of non-zero entries in every group, ``[G]`` (int64)."""
    return (to_groups(tensor, pattern) != 0).sum(dim=1)


def is_nm(tensor: torch.Tensor, pattern: NMPattern) -> bool:
    """True when no group holds more than n non-zeros (a weight may have extra zeros of its own)."""
    try:
        return bool((group_counts(tensor, pattern) <= pattern.n).all())
    except PatternError:
        return False


def block_row_counts(tensor: torch.Tensor, block: int) -> torch.Tensor:
    """Non-zero blocks per block row, ``[out / block]``."""
    return (block_scores(tensor, block, "l1") != 0).sum(dim=1)


def is_block_uniform(tensor: torch.Tensor, pattern: BlockPattern) -> bool:
    """True when every block row holds at most ``kept_per_row`` non-zero blocks."""
    try:
        pattern.check_shape(tuple(tensor.shape))
    except PatternError:
        return False
    return bool((block_row_counts(tensor, pattern.block) <= pattern.kept_per_row(tensor.shape[1])).all())


def satisfies(tensor: torch.Tensor, pattern: Pattern) -> bool:
    """True when ``tensor`` holds ``pattern`` (dispatches on the pattern kind)."""
    if isinstance(pattern, NMPattern):
        return is_nm(tensor, pattern)
    return is_block_uniform(tensor, pattern)


def _slices(rows: int, count: int) -> list[slice]:
    size = rows // count
    return [slice(i * size, (i + 1) * size) for i in range(count)]


def sliced_mask(
    scores: torch.Tensor, patterns: tuple[Pattern, ...] | list[Pattern], absolute: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask for a weight split into ``len(patterns)`` equal row slices, each with its own pattern.

    One pattern is the common case; three are the q, k, v slices of a fused qkv projection.
    A dense pattern (n == m, or block density 1) keeps its whole slice. With ``out`` (shaped like
    ``scores``) the mask is written there as 1/0, slice by slice, and ``out`` is returned.
    """
    if out is not None:
        if out.shape != scores.shape:
            raise ValueError(f"out has shape {list(out.shape)}; the scores have shape {list(scores.shape)}")
        for rows, pattern in zip(_slices(scores.shape[0], len(patterns)), patterns):
            if pattern.is_dense:
                out[rows] = 1
            else:
                compute_mask(scores[rows], pattern, absolute, out=out[rows])
        return out
    parts = []
    for rows, pattern in zip(_slices(scores.shape[0], len(patterns)), patterns):
        part = scores[rows]
        parts.append(
            torch.ones_like(part, dtype=torch.bool) if pattern.is_dense else compute_mask(part, pattern, absolute)
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def sliced_satisfies(tensor: torch.Tensor, patterns: tuple[Pattern, ...] | list[Pattern]) -> bool:
    """True when every row slice of ``tensor`` holds its pattern."""
    return all(
        satisfies(tensor[rows], pattern)
        for rows, pattern in zip(_slices(tensor.shape[0], len(patterns)), patterns)
    )
