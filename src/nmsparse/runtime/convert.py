"""Swap eligible layers of a model (or an export) for sparse runtime modules.

Eligible: a Linear or a Conv2d (groups 1, zero padding) with a float32 weight whose zeros form its
pattern: 1xN blocks (any block size dividing the output channels), or n:m along input channels
(``in``; for a Linear also ``flat``). The pattern comes from the export manifest, from ``patterns``,
or is inferred from the weight's zeros. Everything else stays dense, with the reason in the report.

On CUDA, :func:`to_semi_structured` swaps eligible 2:4 Linear weights (float16/bfloat16) for
PyTorch's semi-structured sparse tensors (cuSPARSELt/CUTLASS), per PyTorch's documented API.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..export.manifest import entry_patterns
from ..mask import is_nm
from ..parametrize import input_map
from ..pattern import BlockPattern, NMPattern, Pattern, parse_pattern
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


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _capture_inputs(model: nn.Module, fqns: list[str], inputs: Any) -> dict[str, torch.Tensor]:
    """The input each named layer receives at its first call when the model runs on ``inputs``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for fqn in fqns:
        def hook(module, args, fqn=fqn):
            if fqn not in seen and args and isinstance(args[0], torch.Tensor):
                seen[fqn] = args[0].detach().clone()
        hooks.append(model.get_submodule(fqn).register_forward_pre_hook(hook))
    try:
        _call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _best_ms(fns: list, repeats: int) -> list[float]:
    """The fastest of ``repeats`` interleaved calls of each function, in ms. The minimum, not the
    median: other tenants and clock changes only ever add time, and on a shared 2-core machine the
    medians of ten calls flipped layers' choices between runs (a ViT fc2 measured 0.66x in one run,
    1.44x in the next; the minima agreed)."""
    from .timing import time_interleaved

    return [1e3 * min(t) for t in time_interleaved(fns, warmup=2, repeats=repeats)]


# The most time the in-model choice of repeated layers may take (the model's call times the timed calls).
_IN_MODEL_BUDGET_MS = 60_000.0


def _time_groups_in_model(model: nn.Module, inputs: Any, candidates: list, groups: dict[tuple, list],
                          keys: list[tuple], repeats: int) -> dict[tuple, float]:
    """For a model larger than the cache: ``{group: whole-model time with the group dense / with it
    sparse}``. Starting from every candidate sparse, each group of repeated layers is timed in the
    model both ways (interleaved) and left in the faster state for the next. Why not the layers
    alone: a layer's call cycled through copies misses what surrounds it in the model (on SmolLM2
    2:4 the layers alone chose 90 of 210 layers and 1.28x; all sparse decoded 1.41x). The model is
    left with every candidate dense; the caller applies the choice."""
    for fqn, _, sparse in candidates:
        model.set_submodule(fqn, sparse)

    def run(key: tuple, sparse: bool) -> Any:
        for fqn, d, s in groups[key]:
            model.set_submodule(fqn, s if sparse else d)
        return _call(model, inputs)

    ratios = {}
    for key in keys:
        dense_ms, sparse_ms = _best_ms([lambda i, k=key: run(k, False), lambda i, k=key: run(k, True)], repeats)
        ratios[key] = dense_ms / sparse_ms
        run(key, ratios[key] >= 1.0)
    for fqn, dense, _ in candidates:
        model.set_submodule(fqn, dense)
    return ratios


def _choice_group(module: nn.Module, row: ConvertRow) -> tuple:
    """Layers that run the same kernels on the same input shape: one layer choice for them all."""
    shape = tuple(module.weight.shape) if hasattr(module, "weight") else (module.out_features, module.in_features)
    return type(module).__name__, shape, row.pattern, tuple(row.input_shape or ())


def _settle_dense(model: nn.Module, fqn: str, form: nn.Module, row: ConvertRow) -> None:
    """Record (and, for a quantized form, put in place) what a layer that does not run sparse runs as."""
    row.packed_bytes = getattr(form, "weight_nbytes", row.dense_bytes)
    row.weights = str(form.scheme) if isinstance(form, QuantLinear) else "fp32"
    if isinstance(form, QuantLinear):
        model.set_submodule(fqn, form)


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
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
            than the cache, by timing the whole model with them sparse and dense (where that
            takes under a minute); the whole model is
            timed before and after, the report carries both, and where the converted model
            measured slower than dense as a whole every layer is put back (``report.reverted``;
            not with ``min_speedup < 1``, which asks for sparse layers even where slower). A model
            larger than the last-level cache has its layers timed with their weights in memory
            (cycling through copies that together exceed the cache; ``report.cold_cache``), the
            state they run in inside the model.
        keep_dense: ``{fqn: reason}`` of layers to leave dense (a choice saved with a compressed export).
        progress: ``"auto"`` shows progress (rate, ETA) while layers are timed; ``"none"`` is silent.
        weights: ``"fp32"`` (default), ``"int8"`` or ``"int4"``: store the Linear layers' weights as
            integers with one scale per ``group_size`` values along the input axis
            (:mod:`nmsparse.runtime.quant`): the kept values of sparse layers, and every other Linear
            (the LM head included) in its dense int8 form (int8 also under ``"int4"``: a dense layer,
            the LM head above all, loses more accuracy to 4 bits than the sparse layers). The layer
            choice then compares a
            layer's quantized sparse form with its quantized dense form. int4 falls back to int8 on
            a layer it cannot store (the row says so). Each quantized layer is checked once against
            its dequantized reference. Convolutions stay float32.
        group_size: values per scale (a multiple of 16 from 16 to 512).
        activations: with quantized weights, ``"int8"`` (default) quantizes each product's input per
            block of one weight group's columns, as llama.cpp's Q8_0 products do, so that the batch-1
            kernels multiply integers (AVX-512 VNNI); ``"fp32"`` keeps float inputs (weight-only).
            1xN layers always keep float inputs. :class:`QuantLinear` gives the exact function.
        decode: give a Llama-architecture causal LM the fused one-call decode step
            (:func:`nmsparse.runtime.decode.attach`; ``report.decode`` says whether it applied and why not).

    Returns:
        ``(model, report)``: the model (eval mode) and a :class:`ConvertReport` with one row per
        Linear/Conv2d layer.
    """
    from . import _native

    scheme = parse_weights(weights, group_size)
    if activations not in ("int8", "fp32"):
        raise QuantError(f"activations {activations!r} is not one of int8, fp32")
    given: dict[str, Pattern] = {}
    exact = False  # an export pruned with --weights: its values already lie on grids, kept as they are
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
    model.eval()
    report = ConvertReport()
    report.weights = str(scheme) if scheme else "fp32"
    unavailable = ""
    try:
        report.isa = _native.require().nms_isa().decode()
    except _native.KernelsUnavailable as exc:
        unavailable = str(exc)
    plan: list[tuple[str, nn.Module, Pattern]] = []
    quant_dense: list[str] = []  # Linear layers without a pattern: their dense quantized form
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
    rows = {row.fqn: row for row in report}
    replaced: dict[str, nn.Module] = {}  # fqn -> the module before conversion or fusion (for a revert)
    inputs = {}
    if example_inputs is not None and plan:
        inputs = _capture_inputs(model, [fqn for fqn, _, _ in plan], example_inputs)
        report.dense_ms = _best_ms([lambda i: _call(model, example_inputs)], repeats)[0]
        from .timing import last_level_cache_bytes

        # a model larger than the cache runs each layer from memory: time the layers that way (timed
        # back to back, a small decode-step layer ran from cache, where dense GEMV is 3-5x faster
        # than from memory, and sparse layers that win in the model were kept dense)
        report.cold_cache = _model_bytes(model) > last_level_cache_bytes()
    from ..progress import Progress

    bar = Progress(len(plan), 0, progress if inputs else "none", 1, True)
    candidates: list[tuple[str, nn.Module, nn.Module]] = []
    for index, (fqn, module, pattern) in enumerate(plan):
        row = rows[fqn]
        try:
            new = _convert_layer(module, pattern, scheme, row, activations, exact)
        except FormatError as exc:
            row.reason = str(exc)
            quant_dense.append(fqn)
            continue
        row.packed_bytes = new.weight_nbytes
        row.weights = getattr(new, "scheme", None) and str(new.scheme) or "fp32"
        module = _dense_form(module, scheme, activations, exact)  # what the layer runs as when not sparse
        x = inputs.get(fqn)
        if x is not None:
            row.input_shape = list(x.shape)
            from .timing import cold_copies, rotating

            if report.cold_cache:
                dense_bytes = getattr(module, "weight_nbytes", row.dense_bytes)
                dense_set, sparse_set = cold_copies(module, dense_bytes), cold_copies(new, new.weight_nbytes)
            else:
                dense_set, sparse_set = [module], [new]
            row.dense_ms, row.sparse_ms = _best_ms([rotating(dense_set, x), rotating(sparse_set, x)], repeats)
            del dense_set, sparse_set
            row.speedup = row.dense_ms / row.sparse_ms
            bar.update(index + 1, f"{fqn}: {row.speedup:.2f}x")
        candidates.append((fqn, module, new))
    bar.close()
    # layers of one shape, pattern and input run the same kernels: one decision for the group, from
    # the median of its layers' ratios (each alone is a few calls of a noisy machine: on SmolLM2 the
    # same 2:4 decode converted 81 of 210 layers in one run and 189 in the next)
    groups: dict[tuple, list[tuple[str, nn.Module, nn.Module]]] = {}  # key -> (fqn, dense, sparse) of timed layers
    for candidate in candidates:
        if rows[candidate[0]].speedup is not None:
            groups.setdefault(_choice_group(candidate[1], rows[candidate[0]]), []).append(candidate)
    in_model: dict[tuple, float] = {}
    repeated = [key for key, group in groups.items() if len(group) > 1]
    if (report.cold_cache and repeated and min_speedup >= 1.0 and report.dense_ms is not None
            and report.dense_ms * len(repeated) * 2 * (repeats + 3) < _IN_MODEL_BUDGET_MS):
        in_model = _time_groups_in_model(model, example_inputs, candidates, groups, repeated, repeats)
    for fqn, module, new in candidates:
        row = rows[fqn]
        if row.speedup is not None:
            key = _choice_group(module, row)
            group = [rows[f] for f, _, _ in groups[key]]
            if key in in_model:
                if in_model[key] < 1.0:
                    row.reason = (
                        f"kept dense: the model ran {in_model[key]:.2f}x as fast with the {len(group)} layers "
                        f"of this shape sparse as with them dense (input {row.input_shape}; this layer alone "
                        f"{row.speedup:.2f}x)"
                    )
                    _settle_dense(model, fqn, module, row)
                    continue
            elif (ratio := statistics.median(r.speedup for r in group)) < min_speedup:
                alone = f"sparse measured {row.speedup:.2f}x of dense"
                if len(group) > 1:
                    alone = (f"the {len(group)} layers of this shape measured {ratio:.2f}x of dense "
                             f"(median; this one {row.speedup:.2f}x)")
                row.reason = f"kept dense: {alone} at input {row.input_shape} (below {min_speedup:g}x)"
                _settle_dense(model, fqn, module, row)
                continue
        replaced[fqn] = module
        model.set_submodule(fqn, new)
        row.converted = True
    for fqn in quant_dense:  # Linear layers without a pattern (the LM head): their dense quantized form
        _settle_dense(model, fqn, _dense_form(model.get_submodule(fqn), scheme, activations, exact), rows[fqn])
    if fuse and any(row.converted for row in report):
        from .fuse import fuse as fuse_following

        before = dict(model.named_modules())
        fused = fuse_following(model).fused
        for row in report:
            row.fused = fused.get(row.fqn, [])
            for absorbed in row.fused:
                replaced[absorbed] = before[absorbed]
    if example_inputs is not None and report.dense_ms is not None:
        report.sparse_ms = _best_ms([lambda i: _call(model, example_inputs)], repeats)[0]
        report.speedup = report.dense_ms / report.sparse_ms
        if replaced and report.speedup < 1.0 <= min_speedup:
            # each layer was faster alone, the model as a whole was not (cache effects between layers,
            # timing noise): put every replaced module back, so that the model is never slower
            for fqn, module in replaced.items():
                model.set_submodule(fqn, module)
            for row in report:
                if row.converted:
                    row.converted, row.fused = False, []
                    _settle_dense(model, row.fqn, replaced[row.fqn], row)
                    row.reason = (f"kept dense: the converted model measured {report.speedup:.2f}x of dense as a "
                                  "whole, so every layer was put back")
            report.reverted = True
    report.decode = _attach_decode(model, decode)
    return model, report


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
