"""Swap eligible layers of a model (or an export) for sparse runtime modules.

Eligible: a Linear or a Conv2d (groups 1, zero padding) with a float32 weight whose zeros form its
pattern: 1xN blocks (any block size dividing the output channels), or n:m along input channels
(``in``; for a Linear also ``flat``). The pattern comes from the export manifest, from ``patterns``,
or is inferred from the weight's zeros. Everything else stays dense, with the reason in the report.

On CUDA, :func:`to_semi_structured` swaps eligible 2:4 Linear weights (float16/bfloat16) for
PyTorch's semi-structured sparse tensors (cuSPARSELt/CUTLASS), per PyTorch's documented API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..export.manifest import entry_patterns
from ..mask import is_nm
from ..pattern import BlockPattern, NMPattern, Pattern, parse_pattern
from ..permute import input_map
from .formats import FormatError, gemm_matrix, pack_block, pack_nm
from .modules import SparseConv2d, SparseLinear

__all__ = ["ConvertRow", "convert", "infer_pattern", "to_semi_structured"]

_NM_CANDIDATES = ("1:4", "2:4", "1:8", "2:8", "4:8", "1:16", "2:16", "4:16")
_BLOCK_CANDIDATES = (32, 16, 8, 4)


@dataclass
class ConvertRow:
    fqn: str
    pattern: str | None
    converted: bool
    reason: str = ""
    dense_bytes: int = 0
    packed_bytes: int = 0
    fused: list[str] = field(default_factory=list)  # modules folded into this layer (runtime.fuse)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def infer_pattern(weight: torch.Tensor) -> Pattern | None:
    """The sparsest listed pattern the weight's zeros satisfy (1xN uniform blocks, then n:m), or None."""
    w = weight.detach()
    density = float(w.ne(0).float().mean())
    if density > 0.75:
        return None
    blocks = []
    for block in _BLOCK_CANDIDATES:
        if w.shape[0] % block == 0:
            rows = w.reshape(w.shape[0] // block, block, w.shape[1], -1).ne(0).any(dim=(1, 3))  # [R, in]
            kept = rows.sum(1)
            if bool((kept == kept[0]).all()) and int(kept[0]) < w.shape[1] * 0.75:
                blocks.append(BlockPattern(block, float(kept[0]) / w.shape[1]))
    if blocks:  # the sparsest uniform layout; among equals the larger block
        return min(blocks, key=lambda p: (p.density, -p.block))
    fits = []
    for text in _NM_CANDIDATES:
        pattern = parse_pattern(text)
        if w.shape[1] % pattern.m == 0 and is_nm(w, pattern):
            fits.append(pattern)
    return min(fits, key=lambda p: (p.density, p.m)) if fits else None


def _convert_layer(module: nn.Module, pattern: Pattern) -> nn.Module:
    weight = module.weight.detach()
    bias = module.bias
    if isinstance(pattern, BlockPattern):
        packed = pack_block(gemm_matrix(weight, "chw"), pattern.block)
        order = "chw"
    else:
        if pattern.axis == "out":
            raise FormatError("n:m along output channels has no CPU kernel (use axis 'in')")
        order = "chw" if pattern.axis == "flat" else "hwc"
        packed = pack_nm(gemm_matrix(weight, order), pattern.n, pattern.m)
    perm = input_map(module)
    if isinstance(module, nn.Linear):
        return SparseLinear(packed, bias, perm)
    return SparseConv2d(packed, bias, module, order, perm)


def _eligible(module: nn.Module) -> str:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return "not a Linear or Conv2d"
    if module.weight.dtype != torch.float32:
        return f"dtype {module.weight.dtype} (the CPU kernels run float32)"
    if module.weight.device.type != "cpu":
        return "not on the CPU"
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return "grouped conv or non-zero padding mode"
    return ""


@torch.no_grad()
def convert(
    model_or_export: nn.Module | str | Path, patterns: dict[str, str | Pattern] | None = None, infer: bool = True,
    fuse: bool = True,
) -> tuple[nn.Module, list[ConvertRow]]:
    """Swap eligible layers for :class:`SparseLinear` / :class:`SparseConv2d` (in place for a model).

    Args:
        model_or_export: a model (dense with zeros) or an export directory (its manifest names the patterns).
        patterns: ``{fqn: pattern}`` for layers to convert (overrides the manifest).
        infer: with no pattern given for a layer, infer one from its zeros.
        fuse: fold eval-mode batch norms and ReLUs that follow converted layers into them
            (:func:`nmsparse.runtime.fuse.fuse`; the absorbed modules become ``nn.Identity``, so the
            state dict loses their entries). Off for a model whose state dict must keep them.

    Returns:
        ``(model, rows)``: the model (eval mode) and one row per Linear/Conv2d layer.
    """
    given: dict[str, Pattern] = {}
    if isinstance(model_or_export, (str, Path)):
        from ..export import load_export

        model, manifest = load_export(model_or_export)
        for entry in manifest.get("layers", []):
            slices = entry_patterns(entry)
            if len({str(p) for p in slices}) == 1:
                given[entry["fqn"]] = slices[0]
    else:
        model = model_or_export
    given.update({f: parse_pattern(p) for f, p in (patterns or {}).items()})
    model.eval()
    rows = []
    for fqn, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        dense_bytes = module.weight.numel() * module.weight.element_size()
        reason = _eligible(module)
        pattern = given.get(fqn)
        if not reason and pattern is None and infer:
            pattern = infer_pattern(module.weight)
        if not reason and pattern is None:
            reason = "dense (no pattern)"
        if reason:
            rows.append(ConvertRow(fqn, str(pattern) if pattern else None, False, reason, dense_bytes, dense_bytes))
            continue
        try:
            new = _convert_layer(module, pattern)  # type: ignore[arg-type]
        except FormatError as exc:
            rows.append(ConvertRow(fqn, str(pattern), False, str(exc), dense_bytes, dense_bytes))
            continue
        model.set_submodule(fqn, new)
        rows.append(ConvertRow(fqn, str(pattern), True, "", dense_bytes, new.weight_nbytes))
    if fuse and any(row.converted for row in rows):
        from .fuse import fuse as fuse_following

        fused = fuse_following(model).fused
        for row in rows:
            row.fused = fused.get(row.fqn, [])
    return model, rows


@torch.no_grad()
def to_semi_structured(model: nn.Module, patterns: dict[str, str] | None = None) -> list[str]:
    """On CUDA: replace the weight of every 2:4 Linear (fp16/bf16, 2:4 along inputs) by a semi-structured
    sparse tensor (``torch.sparse.to_sparse_semi_structured``). Returns the converted fqns.

    Raises:
        RuntimeError: CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("semi-structured 2:4 sparsity needs a CUDA GPU (cuSPARSELt/CUTLASS)")
    from torch.sparse import to_sparse_semi_structured

    done = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cuda":
            continue
        if module.weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        pattern = parse_pattern(patterns[fqn]) if patterns and fqn in patterns else NMPattern(2, 4)
        if not isinstance(pattern, NMPattern) or (pattern.n, pattern.m) != (2, 4) or not is_nm(module.weight, pattern):
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight), requires_grad=False)
        done.append(fqn)
    return done
