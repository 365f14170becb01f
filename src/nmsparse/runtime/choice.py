"""The layer choice of :func:`~nmsparse.runtime.convert.convert`: whether each convertible layer runs
sparse or stays in its dense form, by timing both on this machine at the layer's real input.

* :func:`time_layer` -- one layer, dense and sparse, interleaved (from memory when the model is larger
  than the last-level cache, as it runs inside the model);
* :func:`decide` -- layers of one type, weight shape, pattern and input shape (a transformer's
  repeated blocks) are decided together: by the median of their ratios, or, in a model larger than
  the cache, by timing the whole model with the group sparse and dense;
* :func:`revert_if_slower` -- the whole model timed after conversion; where it is slower than dense
  every layer is put back.

Nothing here packs or swaps layers for good: :mod:`~nmsparse.runtime.convert` does, from the verdicts.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["call", "capture_inputs", "best_ms", "model_bytes", "time_layer", "decide", "revert_if_slower", "resolved",
           "decode_step_timer"]

# The most time the in-model choice of repeated layers may take (the model's call times the timed calls).
IN_MODEL_BUDGET_MS = 60_000.0
# Whole-model ratios closer to 1 than this cannot tell a group's forms apart: the layers alone decide. On
# SmolLM2 the module path's one-token call is ~35 ms, mostly Python, and each group's ratio read 0.98-1.00
# against 2x for its layers alone (in the fused decode step, which runs without that Python, the products
# of the all-sparse int4 model took 2.94 ms a token against the all-dense int8 model's 5.03).
IN_MODEL_RESOLUTION = 0.03

Candidate = tuple[str, nn.Module, nn.Module]  # (fqn, dense form, sparse form)


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def capture_inputs(model: nn.Module, fqns: list[str], inputs: Any) -> dict[str, torch.Tensor]:
    """The input each named layer receives at its first call when the model runs on ``inputs``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for fqn in fqns:
        def hook(module, args, fqn=fqn):
            if fqn not in seen and args and isinstance(args[0], torch.Tensor):
                seen[fqn] = args[0].detach().clone()
        hooks.append(model.get_submodule(fqn).register_forward_pre_hook(hook))
    try:
        call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def best_ms(fns: list, repeats: int) -> list[float]:
    """The fastest of ``repeats`` interleaved calls of each function, in ms. The minimum, not the
    median: other tenants and clock changes only ever add time, and on a shared 2-core machine the
    medians of ten calls flipped layers' choices between runs (the minima agreed)."""
    from .timing import time_interleaved

    return [1e3 * min(t) for t in time_interleaved(fns, warmup=2, repeats=repeats)]


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def time_layer(row, dense: nn.Module, sparse: nn.Module, x: torch.Tensor, cold: bool, repeats: int) -> None:
    """Set ``row``'s ``input_shape``, ``dense_ms``, ``sparse_ms`` and ``speedup``: both forms called at
    ``x``, interleaved; with ``cold`` each cycles through copies that together exceed the cache."""
    from .timing import cold_copies, rotating

    row.input_shape = list(x.shape)
    if cold:
        dense_set = cold_copies(dense, getattr(dense, "weight_nbytes", row.dense_bytes))
        sparse_set = cold_copies(sparse, sparse.weight_nbytes)
    else:
        dense_set, sparse_set = [dense], [sparse]
    # bind each copy's one-token kernel call now: a copy's first call builds it (20-60 us, more for the
    # quantized n:m layouts), which a model pays once and the timed calls (each on a fresh copy) paid
    # every time: SmolLM2's small int4 layers measured 0.5-0.7x of their dense int8 form that way and
    # stayed dense, while bound they run 1.3x faster from memory
    for module in (*dense_set, *sparse_set):
        if (bind := getattr(module, "_gemv", None)) is not None:
            bind()
    row.dense_ms, row.sparse_ms = best_ms([rotating(dense_set, x), rotating(sparse_set, x)], repeats)
    row.speedup = row.dense_ms / row.sparse_ms


def _group_key(module: nn.Module, row) -> tuple:
    """Layers that run the same kernels on the same input shape: one layer choice for them all."""
    shape = tuple(module.weight.shape) if hasattr(module, "weight") else (module.out_features, module.in_features)
    return type(module).__name__, shape, row.pattern, tuple(row.input_shape or ())


def decode_step_timer(model: nn.Module, inputs: Any) -> Callable[[], Callable[[int], Any]] | None:
    """For a model timed at one token that has a fused decode step (a Llama causal LM, see
    :mod:`~nmsparse.runtime.decode`): a function that binds the model's current layers into a decode step
    and returns one call of it (at position 0 of a fresh cache), the per-token work ``generate()`` runs.
    None for any other model or input: the model's own call is timed. The module path's one-token call
    is mostly Python on a small model (SmolLM2: ~35 ms a call against ~3-5 ms of products), so its
    whole-model ratios could not tell a group's forms apart, where the step can."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not (isinstance(ids, torch.Tensor) and tuple(ids.shape) == (1, 1)) or \
            getattr(getattr(model, "config", None), "model_type", None) != "llama" or \
            not (hasattr(model, "generate") and hasattr(model, "lm_head")):  # a causal LM, not the bare decoder
        return None
    from .decode import DecodeCache, DecodeUnavailable, LlamaDecoder

    try:
        LlamaDecoder(model)
    except DecodeUnavailable:
        return None
    token = int(ids[0, 0])

    def bind() -> Callable[[int], Any]:
        decoder = LlamaDecoder(model)
        cache = DecodeCache(decoder, 16)

        def step(i: int) -> Any:
            cache.reset()  # every call at position 0
            return decoder.step(token, cache)

        return step

    return bind


def resolved(ratio: float) -> bool:
    """Whether a whole-model ratio is far enough from 1 to decide (see :data:`IN_MODEL_RESOLUTION`)."""
    return abs(ratio - 1.0) >= IN_MODEL_RESOLUTION


def _time_groups_in_model(model: nn.Module, inputs: Any, candidates: list[Candidate],
                          groups: dict[tuple, list[Candidate]], keys: list[tuple], repeats: int,
                          alone: dict[tuple, float] | None = None, decode: bool = True) -> dict[tuple, float]:
    """For a model larger than the cache: ``{group: whole-model time with the group dense / with it
    sparse}``. Starting from every candidate sparse, each group of repeated layers is timed in the
    model both ways (interleaved) and left in the faster state for the next. Why not the layers
    alone: a layer's call cycled through copies misses what surrounds it in the model. But a group's
    share of a model step can be a few percent, the size of the machine's drift in memory bandwidth
    between calls: where the model's verdict contradicts the group's ``alone`` ratio (the median of
    its layers timed alone, from memory), the group is timed in the model again with three times the
    calls, and that verdict stands. The model is left with every candidate dense; the caller applies
    the choice."""
    for fqn, _, sparse in candidates:
        model.set_submodule(fqn, sparse)
    step_timer = decode_step_timer(model, inputs) if decode else None

    def place(key: tuple, sparse: bool) -> None:
        for fqn, d, s in groups[key]:
            model.set_submodule(fqn, s if sparse else d)

    def run(key: tuple, sparse: bool) -> Any:
        place(key, sparse)
        return call(model, inputs)

    def ratio(key: tuple, calls: int) -> float:
        if step_timer is not None:  # the fused decode step, bound once with the group dense and once sparse
            fns = []
            for sparse in (False, True):
                place(key, sparse)
                fns.append(step_timer())
            dense_ms, sparse_ms = best_ms(fns, calls)
        else:
            dense_ms, sparse_ms = best_ms([lambda i, k=key: run(k, False), lambda i, k=key: run(k, True)], calls)
        return dense_ms / sparse_ms

    ratios = {}
    for key in keys:
        ratios[key] = ratio(key, repeats)
        if alone and key in alone and (ratios[key] >= 1.0) != (alone[key] >= 1.0):
            ratios[key] = ratio(key, 3 * repeats)
        place(key, ratios[key] >= 1.0 if resolved(ratios[key]) or not alone or key not in alone else alone[key] >= 1.0)
    for fqn, dense, _ in candidates:
        model.set_submodule(fqn, dense)
    return ratios


def decide(model: nn.Module, inputs: Any, candidates: list[Candidate], rows: dict[str, Any], cold: bool,
           dense_ms: float | None, min_speedup: float, repeats: int, decode: bool = True) -> dict[str, str]:
    """``{fqn: why it stays dense}`` for the timed candidates that stay dense (absent: runs sparse;
    untimed candidates always run sparse). Groups of repeated layers share one decision: the median
    of their ratios against ``min_speedup``, or, for a model larger than the cache (``cold``) whose
    whole-model calls fit :data:`IN_MODEL_BUDGET_MS`, the model timed with the group sparse and dense
    (with ``decode``, in the fused decode step where the model will get one: :func:`decode_step_timer`)."""
    groups: dict[tuple, list[Candidate]] = {}
    for candidate in candidates:
        if rows[candidate[0]].speedup is not None:
            groups.setdefault(_group_key(candidate[1], rows[candidate[0]]), []).append(candidate)
    in_model: dict[tuple, float] = {}
    repeated = [key for key, group in groups.items() if len(group) > 1]
    if (cold and repeated and min_speedup >= 1.0 and dense_ms is not None
            and dense_ms * len(repeated) * 2 * (repeats + 3) < IN_MODEL_BUDGET_MS):
        medians = {key: statistics.median(rows[fqn].speedup for fqn, _, _ in groups[key]) for key in repeated}
        in_model = _time_groups_in_model(model, inputs, candidates, groups, repeated, repeats, medians, decode)
    dense: dict[str, str] = {}
    for key, group in groups.items():
        timed = [rows[fqn] for fqn, _, _ in group]
        for row in timed:
            if key in in_model and resolved(in_model[key]):
                if in_model[key] < 1.0:
                    dense[row.fqn] = (f"kept dense: the model ran {in_model[key]:.2f}x as fast with the {len(group)} "
                                      f"layers of this shape sparse as with them dense (input {row.input_shape}; this "
                                      f"layer alone {row.speedup:.2f}x)")
            elif (ratio := statistics.median(r.speedup for r in timed)) < min_speedup:
                alone = f"sparse measured {row.speedup:.2f}x of dense"
                if len(group) > 1:
                    alone = (f"the {len(group)} layers of this shape measured {ratio:.2f}x of dense "
                             f"(median; this one {row.speedup:.2f}x)")
                unresolved = (f"; the model timed with them sparse and dense ran {in_model[key]:.2f}x, within "
                              f"{IN_MODEL_RESOLUTION:.0%} of 1, too close to tell") if key in in_model else ""
                dense[row.fqn] = (f"kept dense: {alone} at input {row.input_shape} (below {min_speedup:g}x)"
                                  f"{unresolved}")
    return dense


def revert_if_slower(model: nn.Module, inputs: Any, report, replaced: dict[str, nn.Module], repeats: int,
                     min_speedup: float, settle: Callable[[nn.Module, str, nn.Module, Any], None]) -> None:
    """Time the converted model (``report.sparse_ms``, ``report.speedup``); where it is slower than
    dense as a whole (cache effects between layers, timing noise) and ``min_speedup >= 1``, put every
    ``replaced`` module back (``settle`` records each one's dense form) and set ``report.reverted``."""
    report.sparse_ms = best_ms([lambda i: call(model, inputs)], repeats)[0]
    report.speedup = report.dense_ms / report.sparse_ms
    if not (replaced and report.speedup < 1.0 <= min_speedup):
        return
    for fqn, module in replaced.items():
        model.set_submodule(fqn, module)
    for row in report:
        if row.converted:
            row.converted, row.fused = False, []
            settle(model, row.fqn, replaced[row.fqn], row)
            row.reason = (f"kept dense: the converted model measured {report.speedup:.2f}x of dense as a whole, "
                          "so every layer was put back")
    report.reverted = True
