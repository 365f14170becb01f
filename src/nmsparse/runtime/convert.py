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
from ..parametrize import input_map
from ..pattern import BlockPattern, NMPattern, Pattern, parse_pattern
from . import choice
from .formats import FormatError, gemm_matrix, pack_block, pack_nm
from .modules import QuantLinear, SparseConv2d, SparseLinear
from .quant import DEFAULT_GROUP, QuantError, WeightScheme, parse_weights, quantize, quantize_activations

__all__ = ["ConvertReport", "ConvertRow", "convert", "infer_pattern", "to_semi_structured"]

_NM_CANDIDATES = ("1:4", "2:4", "1:8", "2:8", "4:8", "1:16", "2:16", "4:16")
_BLOCK_CANDIDATES = (32, 16, 8, 4)


@dataclass
class ConvertRow:
    """One Linear/Conv2d layer of a :func:`convert` call.

    ``converted`` says whether the layer runs sparse; ``reason`` why not. With ``example_inputs``,
    ``dense_ms`` / ``sparse_ms`` are the layer's fastest measured calls at its real input and
    ``speedup`` their ratio (the layer stays dense where it is below ``min_speedup``)."""

    fqn: str
    pattern: str | None
    converted: bool
    reason: str = ""
    dense_bytes: int = 0
    packed_bytes: int = 0
    fused: list[str] = field(default_factory=list)  # modules folded into this layer (runtime.fuse)
    dense_ms: float | None = None
    sparse_ms: float | None = None
    speedup: float | None = None
    input_shape: list[int] | None = None
    weights: str = "fp32"  # how the layer's weights are stored as it runs: fp32, int8, int4

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ConvertReport(list):
    """The rows of :func:`convert` (a list of :class:`ConvertRow`), with the whole model's times when
    it was measured: ``dense_ms``, ``sparse_ms`` (fastest calls) and ``speedup``; and the kernels' ``isa``.
    ``cold_cache``: the model is larger than the last-level cache, so each layer was timed with its
    weights in memory, not in cache (as it runs inside the model; :func:`~nmsparse.runtime.timing.cold_copies`)."""

    dense_ms: float | None = None
    sparse_ms: float | None = None
    speedup: float | None = None
    isa: str | None = None
    reverted: bool = False  # the converted model measured slower than dense as a whole: all put back
    weights: str = "fp32"  # the scheme asked for (convert's ``weights``)
    decode: str = ""  # "fused": generate() runs the fused decode step; else why not ("" when not asked)
    cold_cache: bool = False


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


def _quantized(module: nn.Module, layout, scheme: WeightScheme, row: ConvertRow | None,
               activations: str = "int8", exact_grid: bool = False) -> nn.Module:
    """A :class:`QuantLinear` of ``layout`` (a packed layout, or the dense weight matrix) under ``scheme``,
    checked once against its dequantized reference. int4 on a layout it cannot store falls back to
    int8 (said in ``row.reason``).

    Raises:
        FormatError: the quantized product disagrees with its dequantized reference (a kernel fault;
            the caller keeps the layer float32)."""
    try:
        packed = quantize(layout, scheme, exact_grid=exact_grid)
    except FormatError as exc:
        packed = quantize(layout, WeightScheme(8, scheme.group), exact_grid=exact_grid)
        if row is not None:
            row.reason = f"int8 instead of int4: {exc}"
    new = QuantLinear(packed, module.bias, input_map(module), activations)
    _check_quantized(new)
    return new


def _check_quantized(module: QuantLinear) -> None:
    """One batch-1 and one batched call against ``A(x) @ dequantized(W).T + b`` (float32 rounding only;
    ``A`` quantizes the activations where the layer does, see :class:`QuantLinear`)."""
    g = torch.Generator().manual_seed(0)
    weight = module._packed.dense()  # in the packed (possibly permuted) input order
    for rows in (1, 3):
        x = torch.randn(rows, module.in_features, generator=g)
        xin = x if module.input_perm is None else x.index_select(1, module.input_perm)
        if module.act_block:
            xin = quantize_activations(xin, module.act_block)
        ref = torch.nn.functional.linear(xin, weight, module.bias)
        err = float((module(x) - ref).abs().max()) / (float(ref.abs().max()) + 1e-6)
        if not err < 1e-4:
            raise FormatError(f"the int{module.bits} {module.kind} product disagreed with its dequantized reference "
                              f"(relative error {err:.2g} at {rows} row(s)); kept float32")


def _dense_form(module: nn.Module, scheme: WeightScheme | None, activations: str = "int8",
                exact_grid: bool = False) -> nn.Module:
    """What a layer runs as when it does not run sparse: itself, or its dense quantized form."""
    if scheme is None or not isinstance(module, nn.Linear) or _eligible(module):
        return module
    try:  # dense layers are int8 whatever the sparse layers use (as llama.cpp keeps Q4_0's output tensor finer)
        return _quantized(module, module.weight.detach().float(), WeightScheme(8, scheme.group), None, activations,
                          exact_grid)
    except FormatError:
        return module


def _convert_layer(module: nn.Module, pattern: Pattern, scheme: WeightScheme | None = None,
                   row: ConvertRow | None = None, activations: str = "int8", exact_grid: bool = False) -> nn.Module:
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
        if scheme is not None:
            return _quantized(module, packed, scheme, row, activations, exact_grid)
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


def _settle_dense(model: nn.Module, fqn: str, form: nn.Module, row: ConvertRow) -> None:
    """Record (and, for a quantized form, put in place) what a layer that does not run sparse runs as."""
    row.packed_bytes = getattr(form, "weight_nbytes", row.dense_bytes)
    row.weights = str(form.scheme) if isinstance(form, QuantLinear) else "fp32"
    if isinstance(form, QuantLinear):
        model.set_submodule(fqn, form)


@torch.no_grad()
def _load_kernels(report: ConvertReport) -> str:
    """Build (once per machine) and load the kernel library, recording its ISA in ``report``: ``""``, or
    why the kernels are unavailable (every layer then stays dense with that reason)."""
    from . import _native

    try:
        report.isa = _native.require().nms_isa().decode()
    except _native.KernelsUnavailable as exc:
        return str(exc)
    return ""


def _layer_inputs(model: nn.Module, plan: list, example_inputs: Any, report: ConvertReport,
                  repeats: int) -> dict[str, Any]:
    """Each planned layer's input at ``example_inputs`` (none without them); sets the report's whole-model
    dense time and whether the model is larger than the last-level cache."""
    if example_inputs is None or not plan:
        return {}
    from .timing import last_level_cache_bytes

    inputs = choice.capture_inputs(model, [fqn for fqn, _, _ in plan], example_inputs)
    report.dense_ms = choice.best_ms([lambda i: choice.call(model, example_inputs)], repeats)[0]
    # a model larger than the cache runs each layer from memory: time the layers that way (timed
    # back to back, a small decode-step layer runs from cache, and sparse layers that win in the
    # model were kept dense)
    report.cold_cache = choice.model_bytes(model) > last_level_cache_bytes()
    return inputs


def convert(
    model_or_export: nn.Module | str | Path, patterns: dict[str, str | Pattern] | None = None, infer: bool = True,
    fuse: bool = True, example_inputs: Any = None, min_speedup: float = 1.05, repeats: int = 10,
    keep_dense: dict[str, str] | None = None, progress: str = "none", weights: str = "fp32",
    group_size: int = DEFAULT_GROUP, activations: str = "int8", decode: bool = True,
) -> tuple[nn.Module, ConvertReport]:
    """Swap eligible layers for :class:`SparseLinear` / :class:`SparseConv2d` (in place for a model).

    The kernel library is built (once per machine) and loaded here, before any forward; where it
    cannot be, every layer stays dense and each row says why, with the fix.

    Args:
        model_or_export: a model (dense with zeros) or an export directory (its manifest names the patterns).
        patterns: ``{fqn: pattern}`` for layers to convert (overrides the manifest).
        infer: with no pattern given for a layer, infer one from its zeros.
        fuse: fold eval-mode batch norms and ReLUs that follow converted layers into them
            (:func:`nmsparse.runtime.fuse.fuse`; the absorbed modules become ``nn.Identity``, so the
            state dict loses their entries). Off for a model whose state dict must keep them.
        example_inputs: the model's input (a tensor, a tuple of positional inputs, or a dict of
            keyword inputs) at the shape it will run. With it, each eligible layer is timed dense and
            sparse at its real input on this machine (alternating blocks of calls, ``repeats`` each,
            the fastest call of each compared), and stays dense where ``dense_ms / sparse_ms <
            min_speedup`` (default 1.05: a margin against timing noise, since a layer that is not
            measurably faster gains nothing and a mis-measured one would lose). Layers of one type,
            weight shape, pattern and input shape (a transformer's repeated blocks) are decided
            together, by the median of their ratios (each row keeps its own), or, in a model larger
            than the cache, by timing the whole model with them sparse and dense (where that takes
            under a minute). The whole model is timed before and after (both in the report); where
            it measured slower converted, every layer is put back (``report.reverted``; not with
            ``min_speedup < 1``, which asks for sparse layers even where slower). A model larger than
            the last-level cache has its layers timed with their weights in memory, as in the model
            (cycling through copies that together exceed the cache; ``report.cold_cache``).
        keep_dense: ``{fqn: reason}`` of layers to leave dense (a choice saved with a compressed export).
        progress: ``"auto"`` shows progress (rate, ETA) while layers are timed; ``"none"`` is silent.
        weights: ``"fp32"`` (default), ``"int8"`` or ``"int4"``: store the Linear layers' weights as
            integers with one scale per ``group_size`` values along the input axis
            (:mod:`nmsparse.runtime.quant`): the kept values of sparse layers, and every other Linear
            (the LM head included) in its dense int8 form (int8 also under ``"int4"``: a dense layer,
            the LM head above all, loses more accuracy to 4 bits than the sparse layers). The layer
            choice compares a layer's quantized sparse and quantized dense forms. int4 falls back to
            int8 on a layer it cannot store (the row says so). Each quantized layer is checked once
            against its dequantized reference. Convolutions stay float32.
        group_size: values per scale (a multiple of 16 from 16 to 512).
        activations: with quantized weights, ``"int8"`` (default) quantizes each product's input per
            block of one weight group's columns, as llama.cpp's Q8_0 products do, so that the
            kernels multiply integers (VNNI, AVX2); ``"fp32"`` keeps float inputs (weight-only).
            1xN layers always keep float inputs. :class:`QuantLinear` gives the exact function.
        decode: give a Llama-architecture causal LM the fused one-call decode step
            (:func:`nmsparse.runtime.decode.attach`; ``report.decode`` says whether it applied and why not).

    Returns:
        ``(model, report)``: the model (eval mode) and a :class:`ConvertReport` with one row per
        Linear/Conv2d layer.
    """

    scheme = parse_weights(weights, group_size)
    if activations not in ("int8", "fp32"):
        raise QuantError(f"activations {activations!r} is not one of int8, fp32")
    model, given, exact = _source(model_or_export, patterns)
    model.eval()
    report = ConvertReport()
    report.weights = str(scheme) if scheme else "fp32"
    unavailable = _load_kernels(report)
    plan, quant_dense = _plan(model, report, given, infer, scheme, unavailable, keep_dense)
    rows = {row.fqn: row for row in report}
    inputs = _layer_inputs(model, plan, example_inputs, report, repeats)
    forms = _Forms(scheme, activations, exact)
    candidates = _pack(plan, rows, forms, inputs, report.cold_cache, repeats, progress, quant_dense)
    stay_dense = choice.decide(model, example_inputs, candidates, rows, report.cold_cache, report.dense_ms,
                               min_speedup, repeats, decode)
    replaced = _swap(model, candidates, stay_dense, rows, quant_dense, forms)
    if fuse and any(row.converted for row in report):
        _fuse(model, report, replaced)
    if example_inputs is not None and report.dense_ms is not None:
        choice.revert_if_slower(model, example_inputs, report, replaced, repeats, min_speedup, _settle_dense)
    report.decode = _attach_decode(model, decode)
    return model, report


def _swap(model: nn.Module, candidates, stay_dense: dict[str, str], rows: dict[str, ConvertRow],
          quant_dense: list[str], forms: _Forms) -> dict[str, nn.Module]:
    """Put each candidate's packed module in place, or settle it dense where the layer choice said so,
    and give the Linears without a pattern (the LM head) their dense quantized form. Returns ``{fqn: the
    module before}`` of the swapped layers (for a revert)."""
    replaced: dict[str, nn.Module] = {}
    for fqn, module, new in candidates:
        if fqn in stay_dense:
            rows[fqn].reason = stay_dense[fqn]
            _settle_dense(model, fqn, module, rows[fqn])
            continue
        replaced[fqn] = module
        model.set_submodule(fqn, new)
        rows[fqn].converted = True
    for fqn in quant_dense:
        _settle_dense(model, fqn, forms.dense(model.get_submodule(fqn)), rows[fqn])
    return replaced


def _fuse(model: nn.Module, report: ConvertReport, replaced: dict[str, nn.Module]) -> None:
    """Fold the batch norms and ReLUs that follow converted layers into them; each row names what it
    absorbed, and ``replaced`` gains the absorbed modules (for a revert)."""
    from .fuse import fuse as fuse_following

    before = dict(model.named_modules())
    fused = fuse_following(model).fused
    for row in report:
        row.fused = fused.get(row.fqn, [])
        for absorbed in row.fused:
            replaced[absorbed] = before[absorbed]


def _source(model_or_export: nn.Module | str | Path,
            patterns: dict[str, str | Pattern] | None) -> tuple[nn.Module, dict[str, Pattern], bool]:
    """``(model, {fqn: pattern}, exact)``: the model (an export loaded), the patterns given by the
    manifest and then ``patterns``, and whether the values already lie on quantization grids (an
    export pruned with ``--weights``: kept as they are)."""
    given: dict[str, Pattern] = {}
    exact = False
    if isinstance(model_or_export, (str, Path)):
        from ..export import load_export

        model, manifest = load_export(model_or_export)
        exact = bool(manifest.get("weights"))
        for entry in manifest.get("layers", []):
            slices = entry_patterns(entry)
            if len({str(p) for p in slices}) == 1:
                given[entry["fqn"]] = slices[0]
    else:
        model = model_or_export
    given.update({f: parse_pattern(p) for f, p in (patterns or {}).items()})
    return model, given, exact


def _plan(model: nn.Module, report: ConvertReport, given: dict[str, Pattern], infer: bool,
          scheme: WeightScheme | None, unavailable: str,
          keep_dense: dict[str, str] | None) -> tuple[list[tuple[str, nn.Module, Pattern]], list[str]]:
    """One report row per Linear/Conv2d; returns the layers to convert ``(fqn, module, pattern)`` and
    the Linear layers without a pattern that take their dense quantized form."""
    plan: list[tuple[str, nn.Module, Pattern]] = []
    quant_dense: list[str] = []
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
            if scheme is not None and isinstance(module, nn.Linear):
                quant_dense.append(fqn)
        if not reason and unavailable:
            reason = unavailable
        if not reason and keep_dense and fqn in keep_dense:
            reason = keep_dense[fqn]
        report.append(ConvertRow(fqn, str(pattern) if pattern else None, False, reason, dense_bytes, dense_bytes))
        if not reason:
            plan.append((fqn, module, pattern))  # type: ignore[arg-type]
    return plan, quant_dense


@dataclass
class _Forms:
    """How layers are packed: the weight scheme (None: float32), activations, exact grids."""

    scheme: WeightScheme | None
    activations: str
    exact: bool

    def sparse(self, module: nn.Module, pattern: Pattern, row: ConvertRow) -> nn.Module:
        return _convert_layer(module, pattern, self.scheme, row, self.activations, self.exact)

    def dense(self, module: nn.Module) -> nn.Module:
        return _dense_form(module, self.scheme, self.activations, self.exact)


def _pack(plan: list[tuple[str, nn.Module, Pattern]], rows: dict[str, ConvertRow], forms: _Forms,
          inputs: dict[str, torch.Tensor], cold: bool, repeats: int, progress: str,
          quant_dense: list[str]) -> list[choice.Candidate]:
    """``(fqn, dense form, sparse form)`` of every planned layer that packs (a layer that cannot goes
    to ``quant_dense`` with the reason in its row), each timed both ways where its input is known."""
    from ..progress import Progress

    bar = Progress(len(plan), 0, progress if inputs else "none", 1, True)
    candidates: list[choice.Candidate] = []
    for index, (fqn, module, pattern) in enumerate(plan):
        row = rows[fqn]
        try:
            new = forms.sparse(module, pattern, row)
        except FormatError as exc:
            row.reason = str(exc)
            quant_dense.append(fqn)
            continue
        row.packed_bytes = new.weight_nbytes
        row.weights = getattr(new, "scheme", None) and str(new.scheme) or "fp32"
        module = forms.dense(module)  # what the layer runs as when not sparse
        x = inputs.get(fqn)
        if x is not None:
            choice.time_layer(row, module, new, x, cold, repeats)
            bar.update(index + 1, f"{fqn}: {row.speedup:.2f}x")
        candidates.append((fqn, module, new))
    bar.close()
    return candidates


def _attach_decode(model: nn.Module, decode: bool) -> str:
    """Give a converted Llama causal LM the fused decode step (:mod:`nmsparse.runtime.decode`); returns
    what the report says: ``"fused"``, or why the model decodes through its own modules."""
    if not decode or getattr(getattr(model, "config", None), "model_type", None) is None \
            or not hasattr(model, "generate"):
        return "" if not decode else "not a causal LM"
    from .decode import DecodeUnavailable, attach

    try:
        attach(model)
    except DecodeUnavailable as exc:
        return f"module path: {exc}"
    return "fused"


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
