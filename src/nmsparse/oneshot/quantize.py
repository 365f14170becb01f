"""Prune and quantize in one pass: the export's weights on the runtime's integer grid.

:func:`snap_to_grid` rounds every Linear layer of a pruned model (dense with zeros) to the values
the runtime computes with under a :class:`~nmsparse.runtime.quant.WeightScheme`: a sparse layer's
kept values per group of its packed layout, every other Linear (the LM head included) per group of
its rows, in int8 (also under int4, as ``convert`` stores dense layers). The export then stays an
ordinary dense-with-zeros checkpoint (``from_pretrained`` loads
it) whose evaluation is the runtime's function with float activations, and
``convert(export, weights=...)`` with the same scheme finds every value already on its grid (the
group's largest value gives its scale back): no second rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..parametrize import input_map
from ..pattern import BlockPattern, parse_pattern
from ..runtime.formats import FormatError, gemm_matrix, pack_block, pack_nm
from ..runtime.quant import WeightScheme, quantize

__all__ = ["snap_to_grid"]


def _layout(weight: torch.Tensor, pattern: str | None):
    """The float32 layout the runtime packs ``weight`` into (or the weight itself when dense)."""
    if pattern is None or "," in pattern:
        return weight
    parsed = parse_pattern(pattern)
    if isinstance(parsed, BlockPattern):
        return pack_block(weight, parsed.block)
    if parsed.axis != "in":
        return weight
    return pack_nm(weight, parsed.n, parsed.m)


@torch.no_grad()
def snap_to_grid(model: nn.Module, layers: list[dict[str, Any]], scheme: WeightScheme,
                 exact_grid: bool = False) -> dict[str, dict[str, Any]]:
    """Round every Linear weight of ``model`` in place to ``scheme``'s grid (see the module docstring).

    Args:
        layers: the manifest entries of the pruned layers (their patterns give the layouts).
        exact_grid: keep the grids of groups already on one (after SparseGPT's joint rounding;
            :func:`~nmsparse.runtime.quant.quantize_groups`).

    Returns:
        ``{fqn: {"weights": "int8"|"int4"|"fp32", "layout": "nm"|"block"|"dense", "reason": ...}}``:
        what each Linear became (int4 falls back to int8 where its layout cannot hold it; a layer
        with an input permutation map stays float32).
    """
    patterns = {e["fqn"]: e["pattern"] for e in layers}
    out: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32:
            continue
        if input_map(module) is not None:
            out[fqn] = {"weights": "fp32", "layout": "dense", "reason": "an input permutation map"}
            continue
        weight = module.weight
        if weight.data_ptr() in seen:  # a tied weight already rounded (the same tensor)
            continue
        seen.add(weight.data_ptr())
        try:
            layout = _layout(gemm_matrix(weight.detach().float(), "chw"), patterns.get(fqn))
        except FormatError:
            layout = weight.detach().float()
        reason = ""
        layer_scheme = scheme if not isinstance(layout, torch.Tensor) else WeightScheme(8, scheme.group)
        try:
            packed = quantize(layout, layer_scheme, exact_grid=exact_grid)
        except FormatError as exc:
            packed = quantize(layout, WeightScheme(8, scheme.group), exact_grid=exact_grid)
            reason = f"int8 instead of int4: {exc}"
        weight.copy_(packed.dense().view_as(weight))
        out[fqn] = {"weights": f"int{packed.bits}", "layout": packed.kind, "reason": reason}
    return out
