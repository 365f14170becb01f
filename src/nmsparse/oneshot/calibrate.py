"""Calibrated one-shot pruning (wanda, sparsegpt; magnitude with the same report), layer by layer.

The engine under :func:`nmsparse.oneshot.prune`; call that, not this module.

Transformers are pruned **block by block**: the inputs of the first block are captured once, then
for each block the selected layers' input statistics are collected over the calibration data, the
layers are pruned, and the block is re-run to give the next block its inputs -- computed with the
already pruned weights, as SparseGPT and Wanda do. Peak memory stays near the model's size plus one
block's activations and statistics. Models without a repeated block list (CNNs) are calibrated in
one pass over the whole model.

Each layer's relative reconstruction error ``||(W - W') X||^2 / ||W X||^2`` on the calibration
inputs is reported (computed from ``X^T X`` where it was collected).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..export.manifest import layer_entry
from ..mask import sliced_satisfies
from ..method import CalibratedMethod, LayerStats, Method, MethodError
from ..method.base import LayerState, MethodBase
from ..method.sparsegpt import live_mean
from ..models import run_model
from ..parametrize import input_map
from ..pattern import Pattern
from ..progress import Progress
from ..refine import refinable, refine_mask
from ..select import LayerChoice, Selection, nothing_selected, select_layers
from .result import LayerRow

__all__ = ["prune_with_calibration", "prune_blocks", "find_blocks", "first_block_inputs", "release_freed_memory"]

# X^T X is collected for the error report up to this many input columns (per layer); in one-pass mode
# every selected layer holds its statistics at once, so the limit is lower there.
_HESSIAN_MAX_COLUMNS_BLOCK = 8192
_HESSIAN_MAX_COLUMNS_ONE_PASS = 2304


class _StopForward(Exception):
    pass


def _columns(module: nn.Module) -> int:
    return int(module.weight[0].numel())


def _as_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as im2col rows ``[N, columns]``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def find_blocks(model: nn.Module, fqns: Iterable[str]) -> list[tuple[str, nn.Module]] | None:
    """The repeated block list (ModuleList/Sequential of one class) holding most selected layers, or None.

    None unless one list holds at least 80% of the selected layers (then the blocks are assumed to
    be chained: block i+1's first input is block i's output, as in ViT, Swin stages and BERT layers).
    """
    fqns = list(fqns)
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        prefix = f"{name}." if name else ""
        count = sum(f.startswith(prefix) for f in fqns)
        if count > best_count:
            best, best_count = (prefix, module), count
    if best is None or best_count < 0.8 * max(1, len(fqns)):
        return None
    prefix, blocks = best
    return [(f"{prefix}{i}", block) for i, block in enumerate(blocks)]


def first_block_inputs(model: nn.Module, first: nn.Module, batches: list[Any]) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward), torch.no_grad():  # no autograd graph kept with the inputs
                run_model(model, batch)
    finally:
        handle.remove()
    return captured


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the last block back to the OS (glibc keeps freed blocks in its arenas,
    so resident memory would otherwise creep up block after block). A no-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


Calls = Callable[[], list[Callable[[], Any]]]


def _model_calls(model: nn.Module, batches: list[Any]) -> Calls:
    """One call of ``model`` a calibration batch."""
    return lambda: [functools.partial(run_model, model, batch) for batch in batches]


def _run(calls: Calls, twin_calls: Calls | None = None) -> None:
    """Run every call, keeping no outputs (only the statistics hooks see them); a hook may end a call
    early (``_StopForward``). With ``twin_calls`` (the same calls of the dense twin) each twin call runs
    just before its counterpart."""
    ours = calls()
    theirs = twin_calls() if twin_calls is not None else [None] * len(ours)
    for twin_call, call in zip(theirs, ours, strict=True):
        for one in (twin_call, call):
            if one is not None:
                with contextlib.suppress(_StopForward):
                    one()


class Twin:
    """The dense side of asymmetric calibration: an unpruned copy of what is being pruned (one block, or
    the whole model in one-pass mode), run on inputs the dense model computed, call by call beside the
    pruned one, so each layer sees its inputs both ways (:meth:`LayerStats.add_pair`)."""

    def __init__(self, original: nn.Module, prefix: str, calls: Callable[[nn.Module], Calls]) -> None:
        self.module = copy.deepcopy(original)
        self.prefix = prefix  # the fqn of ``original`` in the model ('' for the whole model)
        self.calls = calls(self.module)  # the copy's calls on the dense model's inputs

    def counterpart(self, fqn: str) -> nn.Module:
        return self.module.get_submodule(fqn[len(self.prefix) + 1:] if self.prefix else fqn)


def _hidden_key(kwargs: dict) -> str:
    """The keyword of a block's hidden-state input when it has no positional one."""
    return "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's hidden-state input: its first positional argument, else :func:`_hidden_key`'s kwarg."""
    return args[0] if args else kwargs[_hidden_key(kwargs)]


def _take(obj: Any, start: int, end: int, batch: int) -> Any:
    """``obj`` with every tensor whose first dim is the batch cut to samples ``start:end``."""
    if isinstance(obj, torch.Tensor):
        return obj[start:end] if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(o, start, end, batch) for o in obj)
    if isinstance(obj, dict):
        return {key: _take(value, start, end, batch) for key, value in obj.items()}
    return obj


def _pieces(args: tuple, kwargs: dict, micro_batch: int | None):
    """The captured call ``(args, kwargs)`` cut into micro-batches of at most ``micro_batch`` samples."""
    batch = _hidden(args, kwargs).shape[0]
    size = batch if not micro_batch or micro_batch >= batch else micro_batch
    for start in range(0, batch, size):
        end = min(start + size, batch)
        yield (args, kwargs) if size == batch else (_take(args, start, end, batch), _take(kwargs, start, end, batch))


def _block_calls(block: nn.Module, inputs: list[tuple[tuple, dict]], micro_batch: int | None) -> Calls:
    """One call of the block a micro-batch of its captured inputs."""
    return lambda: [functools.partial(block, *piece_args, **piece_kwargs) for args, kwargs in inputs
                    for piece_args, piece_kwargs in _pieces(args, kwargs, micro_batch)]


def first_sample(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> Callable[[], Any]:
    """A call of ``block`` on the first sample of its captured inputs (what :func:`call_groups` traces)."""
    piece_args, piece_kwargs = next(_pieces(*inputs[0], 1))
    return lambda: block(*piece_args, **piece_kwargs)


@torch.no_grad()
def call_groups(here: list[LayerChoice], run_one: Callable[[], Any]) -> tuple[list[list[LayerChoice]], bool]:
    """The selected layers grouped by the tensor they read, in the order ``run_one()`` (one forward of a
    block or of the whole model) calls them (a Llama block: q/k/v, o, gate/up, down). Layers the forward
    never called come last, as one group. Returns ``(groups, each layer called once)``; with a layer
    called twice (shared weights) the groups still hold, but a forward must not stop early."""
    by_module = {id(c.module): c for c in here}
    groups: list[list[LayerChoice]] = []
    reads: list[torch.Tensor] = []  # each group's input, held so the identity test cannot see a reused id
    calls: dict[str, int] = {}

    def hook(module, args):
        choice = by_module[id(module)]
        calls[choice.fqn] = calls.get(choice.fqn, 0) + 1
        if calls[choice.fqn] > 1:
            return
        for tensor, group in zip(reads, groups):
            if tensor is args[0]:
                group.append(choice)
                return
        reads.append(args[0])
        groups.append([choice])

    handles = [c.module.register_forward_pre_hook(hook) for c in here]
    try:
        run_one()
    finally:
        for handle in handles:
            handle.remove()
    missing = [c for c in here if c.fqn not in calls]
    return groups + ([missing] if missing else []), all(n == 1 for n in calls.values())


@torch.no_grad()
def _advance(block: nn.Module, inputs: list[tuple[tuple, dict]], micro_batch: int | None) -> None:
    """Replace each captured input by the (pruned) block's output. An output of the input's shape is
    written over the input in place, micro-batch by micro-batch, so no second copy is held."""
    for i, (args, kwargs) in enumerate(inputs):
        outputs = []
        for piece_args, piece_kwargs in _pieces(args, kwargs, micro_batch):
            out = block(*piece_args, **piece_kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            hidden = _hidden(piece_args, piece_kwargs)
            if out.shape == hidden.shape and out.dtype == hidden.dtype:
                hidden.copy_(out)
            else:
                outputs.append(out)
        if outputs:  # the block changes the shape (e.g. a downsampling stage): a new tensor
            inputs[i] = _next_inputs(args, kwargs, torch.cat(outputs))


def _next_inputs(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, _hidden_key(kwargs): hidden}


def _stop(_module, _args):
    raise _StopForward


def _collect(choices: list[LayerChoice], method: MethodBase, calls: Calls, max_columns: int,
             refine: bool = False, stop_at: nn.Module | None = None, twin: Twin | None = None) -> dict[str, LayerStats]:
    """Each choice's input statistics over ``calls``; a forward ends once ``stop_at`` has read its input.
    With a ``twin``, each layer's inputs are paired with its counterpart's (asymmetric calibration)."""
    stats, handles = {}, []
    needs_h = refine or (isinstance(method, CalibratedMethod) and method.needs_hessian)
    for choice in choices:
        module = choice.module
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            raise MethodError(
                f"{choice.fqn}: calibrated pruning of grouped convs is not supported; skip it with a rule"
            )
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise MethodError(
                f"{choice.fqn}: calibrated pruning supports Linear and Conv2d, not {type(module).__name__}"
            )
        cols = _columns(module)
        layer_stats = LayerStats(cols, needs_h or cols <= max_columns, drift=twin is not None)
        stats[choice.fqn] = layer_stats
        dense_rows: deque[torch.Tensor] = deque()  # the twin's rows, waiting for the same call here

        def hook(mod, args, _stats=layer_stats, _dense=dense_rows):
            rows = _as_rows(mod, args[0])
            _stats.add_pair(_dense.popleft(), rows) if twin is not None else _stats.add(rows)

        handles.append(module.register_forward_pre_hook(hook))
        if twin is not None:
            handles.append(twin.counterpart(choice.fqn).register_forward_pre_hook(
                lambda mod, args, _dense=dense_rows: _dense.append(_as_rows(mod, args[0]).detach().clone())))
    if stop_at is not None:  # registered last, so it runs after that layer's statistics hook
        handles.append(stop_at.register_forward_pre_hook(_stop))
        if twin is not None:
            handles.append(twin.counterpart(next(c.fqn for c in choices if c.module is stop_at))
                           .register_forward_pre_hook(_stop))
    try:
        with torch.no_grad():
            _run(calls, twin.calls if twin is not None else None)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _relative_error(weight: torch.Tensor, new_weight: torch.Tensor, xtx: torch.Tensor) -> float:
    """``||(W - W') X||^2 / ||W X||^2`` from ``X^T X``, over row chunks (bounded temporaries)."""
    num = den = 0.0
    for w0, w1 in zip(weight.split(256), new_weight.split(256)):
        den += float(((w0 @ xtx) * w0).sum())
        delta = w0 - w1
        num += float(((delta @ xtx) * delta).sum())
    return num / max(den, 1e-30)


def _refine(method: MethodBase, weight: torch.Tensor, new_weight: torch.Tensor, mask: torch.Tensor,
            patterns: tuple[Pattern, ...], stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The layer's mask refined against its output error (:mod:`nmsparse.refine`) and the weight for
    it (re-solved by methods that update weights); the refined layer is kept only where its error is
    lower than the method's own. Returns ``(weight, mask, what happened)``."""
    if why := refinable(tuple(weight.shape), patterns):
        return new_weight, mask, {"skipped": why}
    t0 = time.perf_counter()
    w = weight.float()
    result = refine_mask(w, mask, stats.gram(), patterns[0])
    note: dict[str, Any] = {"swaps": result.swaps, "rounds": result.rounds}
    if result.swaps:
        candidate = (method.reweigh(weight, result.mask, patterns, stats) if isinstance(method, CalibratedMethod)
                     else weight * result.mask)
        before = _relative_error(w, new_weight.float(), stats.gram())
        after = _relative_error(w, candidate.float(), stats.gram())
        note.update(error_before=before, error_after=after, kept=after <= before)
        if after <= before:
            new_weight, mask = candidate, result.mask
    note["seconds"] = round(time.perf_counter() - t0, 3)
    return new_weight, mask, note


# ridge of the asymmetric target's solve, as a fraction of mean(diag X^T X) (SparseGPT's default dampening)
ASYMMETRIC_DAMPENING = 0.01


@torch.no_grad()
def asymmetric_target(weight: torch.Tensor, stats: LayerStats, dampening: float = ASYMMETRIC_DAMPENING) -> torch.Tensor:
    """The weight that gives, on the inputs ``X`` the pruned model computes, what ``weight`` gives on the
    dense model's inputs ``X_d``: ``argmin ||X_d W^T - X V^T||^2 + lambda ||V - W||^2`` over ``V``, i.e.
    ``W + W D (H + lambda I)^-1`` with ``D = (X_d - X)^T X``, ``H = X^T X`` (:meth:`LayerStats.add_pair`) and
    lambda = ``dampening`` x mean(diag H). Pruning this target instead of ``W`` makes the layer also undo
    the drift the layers pruned before it left in its inputs (GPTQ-style calibration on the pruned
    model's inputs fits ``W`` to them instead)."""
    w = weight.reshape(weight.shape[0], -1).float()
    h = stats.gram().clone()
    h.diagonal().add_(dampening * live_mean(h.diagonal()))
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise MethodError("asymmetric calibration: X^T X is not positive definite even with the ridge; "
                          "use more calibration samples")
    shift = torch.cholesky_solve((w @ stats.drift).t().contiguous(), factor).t()
    return (w + shift).reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def _prune_layer(choice: LayerChoice, method: MethodBase, stats: LayerStats, refine: bool = False) -> LayerRow:
    module = choice.module
    weight = module.weight.detach()
    if stats.drift is not None:  # asymmetric calibration: prune the layer's target on these inputs
        weight = asymmetric_target(weight, stats)
        stats.drift = None
    patterns: tuple[Pattern, ...] = choice.patterns
    if isinstance(method, CalibratedMethod):
        new_weight, mask = method.prune_weight(weight, patterns, stats)
    else:  # a one-shot training method (magnitude): its masks, with the same report
        assert isinstance(method, Method)
        mask = method.mask(LayerState(choice.fqn, module, patterns))
        new_weight = weight * mask
    refinement = None
    if refine:
        new_weight, mask, refinement = _refine(method, weight, new_weight, mask, patterns, stats)
    new_weight = new_weight.mul_(mask).to(weight.dtype)  # the methods return new tensors
    del mask
    error = None
    if refinement and "kept" in refinement:  # measured by the refinement, for the weight kept
        error = refinement["error_after" if refinement["kept"] else "error_before"]
    elif stats.xtx is not None:
        rows = weight.shape[0]
        error = _relative_error(weight.reshape(rows, -1).float(), new_weight.reshape(rows, -1).float(), stats.xtx)
    module.weight.copy_(new_weight)
    return LayerRow(choice.fqn, tuple(weight.shape), ",".join(sorted({str(p) for p in patterns})),
                    int(torch.count_nonzero(new_weight)) / new_weight.numel(), sliced_satisfies(new_weight, patterns),
                    error, refinement=refinement)


BlockHook = Callable[[int, str, nn.Module, list[LayerChoice]], None]


def _prune_layers(here: list[LayerChoice], method: MethodBase, calls: Calls,
                  run_one: Callable[[], Any] | None, max_columns: int, refine: bool,
                  twin: Twin | None = None) -> list[LayerRow]:
    """Calibrate the layers over ``calls`` and prune them: all at once, or with ``run_one`` (one traced
    forward, :func:`call_groups`) group by group in call order, each group's statistics collected after
    the groups before it are pruned, its forwards stopped once its last layer has read its input. With a
    ``twin``, each layer is pruned toward its asymmetric target (:func:`asymmetric_target`)."""
    groups, once = call_groups(here, run_one) if run_one is not None else ([here], False)
    rows = []
    for group in groups:
        stats = _collect(group, method, calls, max_columns, refine, group[-1].module if once else None, twin)
        release_freed_memory()
        for choice in group:
            rows.append(_prune_layer(choice, method, stats.pop(choice.fqn), refine))
            release_freed_memory()
    return rows


def prune_blocks(blocks: list[tuple[str, nn.Module]], selected: list[LayerChoice], method: MethodBase,
                 capture: Callable[[nn.Module], list[tuple[tuple, dict]]] | None, micro_batch: int | None,
                 refine: bool, bar: Progress, before: BlockHook | None = None,
                 after: BlockHook | None = None, sequential: bool = False,
                 asymmetric: bool = False) -> tuple[list[LayerRow], set[str]]:
    """The one block-by-block loop of calibrated pruning (in memory, and streamed from shards).

    For each ``(fqn, block)``: ``before(index, fqn, block, here)`` (streaming materialises the block
    there), the first block's inputs captured by ``capture(block)``, the selected layers inside the block
    (``here``) calibrated on the block's current inputs and pruned, the block run to give the next
    block its inputs (computed with the pruned weights), then ``after(...)`` (streaming writes and
    releases the block there). With ``capture`` None there is no calibration data: each layer gets the
    method's own statistics-free mask (magnitude). ``sequential`` calibrates the block's layers group by
    group in the order the block calls them (:func:`call_groups`), each group on inputs computed with the
    groups before it already pruned (GPTQ's "true sequential"); otherwise all of them on the dense block.
    ``asymmetric`` also carries the dense model's inputs of each block and runs an unpruned copy of the
    block on them beside the pruned one: each layer is pruned toward :func:`asymmetric_target`.

    Returns:
        ``(report rows, fqns of the pruned layers)``.
    """
    rows: list[LayerRow] = []
    done: set[str] = set()
    inputs = dense_inputs = None
    for index, (prefix, block) in enumerate(blocks):
        here = [c for c in selected if c.fqn.startswith(prefix + ".")]
        if before is not None:
            before(index, prefix, block, here)
        if capture is not None and inputs is None:
            inputs = capture(block)
            if asymmetric:  # the dense model's block inputs: equal so far, then apart
                dense_inputs = [_next_inputs(args, kwargs, _hidden(args, kwargs).clone()) for args, kwargs in inputs]
            release_freed_memory()
        done.update(c.fqn for c in here)
        twin = (Twin(block, prefix, lambda copy_, ins=dense_inputs: _block_calls(copy_, ins, micro_batch))
                if dense_inputs is not None else None)
        if here:
            if inputs is None:  # no calibration data: each layer's statistics-free mask
                rows += [_prune_layer(c, method, LayerStats(int(c.module.weight[0].numel()), False), refine)
                         for c in here]
            else:
                rows += _prune_layers(here, method, _block_calls(block, inputs, micro_batch),
                                      first_sample(block, inputs) if sequential else None,
                                      _HESSIAN_MAX_COLUMNS_BLOCK, refine, twin)
        if inputs is not None and index + 1 < len(blocks):
            _advance(block, inputs, micro_batch)
            if twin is not None:
                _advance(twin.module, dense_inputs, micro_batch)
            release_freed_memory()
        del twin
        if after is not None:
            after(index, prefix, block, here)
        bar.update(index + 1, f"block {prefix}: {len(here)} layers")
    return rows, done


def prune_with_calibration(
    model: nn.Module,
    batches: list[Any],
    pattern: str | Pattern,
    method: MethodBase,
    selection: Selection | None = None,
    progress: str = "auto",
    micro_batch: int | None = 4,
    refine: bool = False,
    sequential: bool = False,
    asymmetric: bool = False,
) -> tuple[list[dict[str, Any]], list[LayerRow], list[dict[str, str]]]:
    """Prune ``model`` in place with calibration data; see the module docstring.

    Args:
        model: any module whose selected layers are Linear or Conv2d (groups = 1).
        batches: calibration inputs, each a tensor or a dict of keyword tensors for ``model``.
        pattern: default pattern.
        method: a built one-shot method (``wanda``, ``sparsegpt``, or ``magnitude``, which ignores
            the data but reports reconstruction errors on it).
        selection: layer sets, rules and guards.
        progress: ``auto``, ``bar``, ``lines`` or ``none`` (one tick per block).
        micro_batch: samples per block forward in block-by-block mode (each calibration batch is
            cut into micro-batches, so only a few samples' attention and MLP activations exist at
            once); None runs whole batches. The statistics are the same sums either way.
        refine: refine each layer's mask against its output error (:mod:`nmsparse.refine`; n:m and
            1xN Linear layers; others are reported as skipped in the row's ``refinement``).
        sequential: inside each block (in a model without repeated blocks: over the whole model),
            calibrate the layers group by group in call order, each group on inputs that pass through the
            already pruned groups (see :func:`prune_blocks`).
        asymmetric: prune each layer toward the weight that gives, on the inputs the pruned model
            computes, what the dense layer gives on the dense model's inputs (:func:`asymmetric_target`;
            needs a method that updates kept weights; an unpruned copy of each block, or of the whole
            model without repeated blocks, runs beside the pruned one).

    Returns:
        ``(manifest entries, report rows, skipped layers)``; the model is left dense with zeros.
    """
    if not batches:
        raise MethodError("calibrated pruning needs at least one calibration batch")
    model.eval()
    choices = select_layers(model, selection or Selection(), pattern)
    selected = [c for c in choices if c.selected]
    if not selected:
        raise MethodError(nothing_selected(model, "for pruning"))
    rows: list[LayerRow] = []
    blocks = find_blocks(model, [c.fqn for c in selected])
    if blocks is None:  # one pass over the model (sequential: one pass a group, in the model's call order)
        bar = Progress(1, 0, progress, every=1)
        twin = Twin(model, "", lambda copy_: _model_calls(copy_, batches)) if asymmetric else None
        rows += _prune_layers(selected, method, _model_calls(model, batches),
                              (lambda: run_model(model, batches[0])) if sequential else None,
                              _HESSIAN_MAX_COLUMNS_ONE_PASS, refine, twin)
        del twin
        bar.update(1, f"{len(selected)} layers pruned in one pass" + (" a group" if sequential else ""))
        bar.close()
    else:
        bar = Progress(len(blocks), 0, progress, every=1)
        block_rows, in_blocks = prune_blocks(blocks, selected, method,
                                             lambda first: first_block_inputs(model, first, batches), micro_batch,
                                             refine, bar, sequential=sequential, asymmetric=asymmetric)
        rows += block_rows
        bar.close()
        rest = [c for c in selected if c.fqn not in in_blocks]
        if rest:  # e.g. a pooler or head outside the blocks: one pass with the blocks already pruned
            stats = _collect(rest, method, _model_calls(model, batches), _HESSIAN_MAX_COLUMNS_BLOCK, refine)
            rows += [_prune_layer(c, method, stats[c.fqn], refine) for c in rest]
    layers = [layer_entry(c.fqn, c.module.weight, c.patterns, input_map(c.module)) for c in selected]
    skipped = [{"fqn": c.fqn, "reason": c.skip_reason or ""} for c in choices if not c.selected]
    rows += [LayerRow(c.fqn, tuple(c.module.weight.shape), None, float((c.module.weight != 0).float().mean()), None,
                      None, c.skip_reason) for c in choices if not c.selected]
    return layers, rows, skipped
