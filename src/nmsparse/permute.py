"""Input-channel permutation before n:m pruning (the idea of NVIDIA ASP's permutation search).

Groups of m run along input channels; which channels share a group decides how much weight
magnitude an n:m mask can keep. :func:`search_permutation` finds a permutation of a layer's input
channels that raises the kept magnitude: starting from the identity, it swaps one channel of a group
with one channel of another whenever that raises the two groups' kept magnitude, sweeping over all
group pairs until a sweep finds nothing (or ``max_sweeps``). It never lowers the kept magnitude.

A permutation changes the function unless the channels are permuted where they are produced too.
:func:`permute_channels` traces the model with ``torch.fx`` and folds each layer's permutation into
its producer when the path between them is private and per-channel: producer conv/linear ->
(batch norm, activations, dropout)* -> layer, each node with one user (the conv -> bn -> act -> conv
chains inside timm/torchvision ResNet blocks). Layers whose input comes from a residual sum or a
shared tensor get an *input index map* instead (``unfoldable="index_map"``, the default): their
weight columns are permuted and a forward pre-hook gathers the input channels in the same order,
so the function is unchanged; squash writes the map into the manifest entry
(``input_permutation``), :func:`nmsparse.export.load_export` re-attaches the gather, and the
runtime applies it before its kernel. With ``unfoldable="skip"`` such layers keep their order.

Decoder blocks of Hugging Face causal LMs do not trace with ``torch.fx``; their two foldable pairs are
found by structure instead (:func:`decoder_pairs`): a gated MLP's ``down_proj`` takes its input
channels from ``gate_proj`` and ``up_proj`` rows (``down(act(gate(x)) * up(x))`` is elementwise in
the intermediate channels), and an attention's ``o_proj`` takes each head's value channels from
``v_proj`` rows (attention mixes tokens, never channels, and query head h reads KV head h // (heads /
kv heads)), so ``o_proj``'s columns are permuted within each head, one permutation per KV head shared by
the query heads that read it. Both fold into the weights: the exported model is an ordinary model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .parametrize import attach_input_map
from .pattern import NMPattern, parse_pattern
from .select import Selection, select_layers

__all__ = ["PermutationResult", "LayerPermutation", "kept_magnitude", "search_permutation", "permute_channels",
           "decoder_pairs", "DecoderPair", "balanced_order"]

def _columns(weight: torch.Tensor) -> torch.Tensor:
    """``[rows, in]``: |W| with one column per input channel (rows = out * kh * kw)."""
    w = weight.detach().abs().float()
    return w.movedim(1, -1).reshape(-1, w.shape[1])


def _kept(cols: torch.Tensor, n: int) -> torch.Tensor:
    """Kept magnitude of groups ``[..., rows, m]``: sum over rows of the top n of each row."""
    return torch.topk(cols, n, dim=-1).values.sum(dim=(-1, -2))


def kept_magnitude(weight: torch.Tensor, pattern: NMPattern, perm: torch.Tensor | None = None) -> float:
    """Sum of |w| an n:m mask along input channels keeps, optionally after permuting the channels."""
    cols = _columns(weight)
    if perm is not None:
        cols = cols[:, perm]
    groups = cols.reshape(cols.shape[0], -1, pattern.m).transpose(0, 1)  # [G, rows, m]
    return float(_kept(groups, pattern.n).sum())


@dataclass
class PermutationResult:
    perm: torch.Tensor  # new channel j is old channel perm[j]
    before: float
    after: float
    sweeps: int

    @property
    def gain(self) -> float:
        """Relative gain in kept magnitude."""
        return self.after / self.before - 1.0 if self.before > 0 else 0.0


def _leave_one_out(values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups ``[..., rows, m]``: with column i left out, the sum of the top n (S) and the n-th
    largest (T) of the rest, each ``[..., rows, m]``. Adding a value x to that group keeps
    S + max(0, x - T)."""
    m = values.shape[-1]
    sums, nth = [], []
    for i in range(m):
        rest = torch.cat([values[..., :i], values[..., i + 1:]], dim=-1)
        top = torch.topk(rest, n, dim=-1).values
        sums.append(top.sum(-1))
        nth.append(top[..., -1])
    return torch.stack(sums, -1), torch.stack(nth, -1)


MAX_SWEEPS = 100  # a cap only: the search stops at the first sweep that gains nothing


def balanced_order(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """A permutation that deals the input channels, sorted by summed magnitude, across the groups in
    snake order (group g gets the g-th largest, the g-th of the next band counted from the end, ...),
    so that no group holds several of the strongest channels (RIA's channel reallocation idea). One
    sort: a starting point for :func:`search_permutation` on wide layers, where each sweep is costly."""
    cols = _columns(weight)
    channels, m = cols.shape[1], pattern.m
    groups = channels // m
    order = cols.sum(0).argsort(descending=True)
    perm = torch.empty_like(order)
    for band in range(m):
        chosen = order[band * groups:(band + 1) * groups]
        perm[torch.arange(groups) * m + band] = chosen.flip(0) if band % 2 else chosen
    return perm


@torch.no_grad()
def search_permutation(weight: torch.Tensor, pattern: NMPattern, max_sweeps: int = MAX_SWEEPS,
                       start: torch.Tensor | None = None) -> PermutationResult:
    """Channel swaps between groups that raise the kept magnitude (see module docstring), sweep after
    sweep until one finds no gain (at most ``max_sweeps``; three sweeps left 10-25% of the gain of
    NVIDIA apex's exhaustive search unrealised, docs/methods.md), from the identity or from ``start``
    (a permutation, e.g. :func:`balanced_order`; used only where it keeps more than the identity).

    For each group a, the best single swap with any later group b is found at once (the gain of
    every (a, b, i, j) from leave-one-out sums, O(rows * m^2) per pair) and applied when positive.
    """
    pattern = parse_pattern(pattern)  # type: ignore[assignment]
    cols = _columns(weight)
    rows, channels = cols.shape
    m, n = pattern.m, pattern.n
    if channels % m:
        raise ValueError(f"{channels} input channels are not a multiple of m={m}")
    perm = torch.arange(channels)
    before = kept_magnitude(weight, pattern)
    if n >= m or channels == m:
        return PermutationResult(perm, before, before, 0)
    if start is not None and kept_magnitude(weight, pattern, start) > before:
        perm = start.clone()
        cols = cols[:, perm]
    groups = channels // m
    values = cols.t().reshape(groups, m, rows).transpose(1, 2).contiguous()  # [G, rows, m]
    kept = _kept(values, n)  # [G]
    sums, nth = _leave_one_out(values, n)  # [G, rows, m]
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - the count is reported
        improved = False
        for a in range(groups - 1):
            va, sa, ta = values[a], sums[a], nth[a]  # [rows, m]
            vb, sb, tb = values[a + 1:], sums[a + 1:], nth[a + 1:]  # [B, rows, m]
            # a' = a without i plus b_j;  b' = b without j plus a_i
            gain_a = (sa.unsqueeze(-1) + (vb.unsqueeze(2) - ta.unsqueeze(-1)).clamp_min(0)).sum(1)  # [B, i, j]
            gain_b = (sb.unsqueeze(2) + (va.unsqueeze(-1) - tb.unsqueeze(2)).clamp_min(0)).sum(1)  # [B, i, j]
            new = gain_a + gain_b
            delta = new - (kept[a] + kept[a + 1:]).view(-1, 1, 1)
            flat = int(torch.argmax(delta))
            b_off, rest = divmod(flat, m * m)
            i, j = divmod(rest, m)
            if float(delta.view(-1)[flat]) <= 1e-6 * float(kept[a] + kept[a + 1 + b_off]):
                continue
            b = a + 1 + b_off
            ca, cb = a * m + i, b * m + j
            perm[ca], perm[cb] = int(perm[cb]), int(perm[ca])
            va_i = values[a, :, i].clone()
            values[a, :, i] = values[b, :, j]
            values[b, :, j] = va_i
            for g in (a, b):
                kept[g] = _kept(values[g], n)
                s_g, t_g = _leave_one_out(values[g], n)
                sums[g], nth[g] = s_g, t_g
            improved = True
        if not improved:
            break
    return PermutationResult(perm, before, kept_magnitude(weight, pattern, perm), sweeps)


# ------------------------------------------------------------------------------------- folding
_PASSTHROUGH_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish,
                        nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Tanh, nn.Sigmoid)
_PASSTHROUGH_FUNCTIONS = (torch.relu, nn.functional.relu, nn.functional.gelu, nn.functional.silu, torch.sigmoid,
                          torch.tanh, nn.functional.relu6, nn.functional.dropout)


def _is_passthrough(node: Any, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return True
        # timm wraps activations/norms (e.g. BatchNormAct2d is a BatchNorm subclass); plain elementwise modules
        return isinstance(module, _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_", "sigmoid", "tanh")
    return False


def _producer_chain(node: Any, modules: dict[str, nn.Module]) -> tuple[str | None, list[str], str]:
    """Walk back from a layer's input to the producing conv/linear: ``(producer, per-channel modules, reason)``."""
    chain: list[str] = []
    current = node.args[0] if node.args else None
    while current is not None:
        if len(current.users) != 1:
            return None, [], f"its input '{current.name}' is also used elsewhere (residual or branch)"
        if current.op == "call_module" and isinstance(modules[current.target], (nn.Conv2d, nn.Linear)):
            producer = modules[current.target]
            if isinstance(producer, nn.Conv2d) and producer.groups != 1:
                return None, [], f"its producer {current.target} is a grouped conv"
            return current.target, chain, ""
        if not _is_passthrough(current, modules):
            what = current.target if current.op != "placeholder" else "the model input"
            return None, [], f"its input passes through {what!r}, which channels cannot be permuted across"
        if current.op == "call_module" and isinstance(modules[current.target], nn.modules.batchnorm._BatchNorm):
            chain.append(current.target)
        current = current.args[0] if current.args else None
    return None, [], "no producer found"


@torch.no_grad()
def _permute_outputs(module: nn.Module, perm: torch.Tensor) -> None:
    module.weight.data = module.weight.data[perm].clone()
    if getattr(module, "bias", None) is not None:
        module.bias.data = module.bias.data[perm].clone()


@torch.no_grad()
def _permute_norm(module: nn.Module, perm: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(module, name, None)
        if tensor is not None:
            tensor.data = tensor.data[perm].clone()


@dataclass
class LayerPermutation:
    fqn: str
    folded_into: str | None
    kept_before: float
    kept_after: float
    reason: str = ""
    input_map: bool = False

    @property
    def gain(self) -> float:
        return self.kept_after / self.kept_before - 1.0 if self.kept_before > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"fqn": self.fqn, "folded_into": self.folded_into, "input_map": self.input_map,
                "kept_before": round(self.kept_before, 6), "kept_after": round(self.kept_after, 6),
                "gain": round(self.gain, 6), "reason": self.reason}


@dataclass(frozen=True)
class DecoderPair:
    """A consumer whose input channels are rows of ``producers`` (see module docstring); ``head_dim``
    set for ``o_proj`` (permuted within heads), with ``per_kv`` query heads per KV head."""

    producers: tuple[str, ...]
    head_dim: int | None = None
    per_kv: int = 1


def decoder_pairs(model: nn.Module) -> dict[str, DecoderPair]:
    """The foldable pairs of a decoder's blocks by module structure: consumer fqn -> its pair."""
    pairs: dict[str, DecoderPair] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        linear = {a: getattr(module, a, None) for a in ("gate_proj", "up_proj", "down_proj", "v_proj", "o_proj")}
        if all(isinstance(linear[a], nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            pairs[prefix + "down_proj"] = DecoderPair((prefix + "gate_proj", prefix + "up_proj"))
        hd = getattr(module, "head_dim", None)
        v, o = linear["v_proj"], linear["o_proj"]
        if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and isinstance(hd, int) and hd > 0:
            kv, heads = divmod(v.out_features, hd), divmod(o.in_features, hd)
            if kv[1] == 0 and heads[1] == 0 and kv[0] and heads[0] % kv[0] == 0:
                pairs[prefix + "o_proj"] = DecoderPair((prefix + "v_proj",), hd, heads[0] // kv[0])
    return pairs


def _fold_decoder_pair(fqn: str, pair: DecoderPair, modules: dict[str, nn.Module], pattern: NMPattern,
                       max_sweeps: int) -> LayerPermutation:
    consumer = modules[fqn]
    weight = consumer.weight.data
    before = kept_magnitude(weight, pattern)
    if pair.head_dim is None:  # wide: start from the balanced deal, then polish with swaps
        perm = search_permutation(weight, pattern, max_sweeps, balanced_order(weight, pattern)).perm
        producer_perm = perm
    else:
        hd, per = pair.head_dim, pair.per_kv
        if hd % pattern.m:
            return LayerPermutation(fqn, None, before, before, f"head dim {hd} is not a multiple of m={pattern.m}")
        perm = torch.arange(weight.shape[1])
        producer_perm = torch.arange(weight.shape[1] // per)
        for j in range(weight.shape[1] // (hd * per)):  # KV head j, read by query heads j*per .. j*per+per-1
            heads = range(j * per, (j + 1) * per)
            stacked = torch.cat([weight[:, h * hd:(h + 1) * hd] for h in heads], 0)
            local = search_permutation(stacked, pattern, max_sweeps).perm
            producer_perm[j * hd:(j + 1) * hd] = j * hd + local
            for h in heads:
                perm[h * hd:(h + 1) * hd] = h * hd + local
    after = kept_magnitude(weight, pattern, perm)
    if after <= before:
        return LayerPermutation(fqn, None, before, before, "no swap raised the kept magnitude")
    consumer.weight.data = weight[:, perm].clone()
    for producer in pair.producers:
        _permute_outputs(modules[producer], producer_perm)
    return LayerPermutation(fqn, ", ".join(pair.producers), before, after)


@torch.no_grad()
def permute_channels(
    model: nn.Module, pattern: str | NMPattern = "2:4", selection: Selection | None = None,
    max_sweeps: int = MAX_SWEEPS, unfoldable: str = "index_map", progress: str = "none",
) -> list[LayerPermutation]:
    """Permute the input channels of every selected n:m layer (folded into its producer, or through
    an input index map; see module docstring).

    The model computes the same function afterwards (up to float summation order). Run it before
    :meth:`Sparsifier.prepare`. Returns one row per selected layer (gain, producer or map, or why not).
    """
    if unfoldable not in ("index_map", "skip"):
        raise ValueError(f"unfoldable must be 'index_map' or 'skip', got {unfoldable!r}")
    pattern = parse_pattern(pattern)
    choices = [c for c in select_layers(model, selection or Selection(), pattern) if c.selected]
    pairs = decoder_pairs(model)
    graph, untraced = None, ""
    if any(c.fqn not in pairs for c in choices):
        try:
            graph = torch.fx.symbolic_trace(model).graph
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: no folding possible
            untraced = f"the model is not traceable with torch.fx ({type(exc).__name__})"
    from .progress import Progress

    modules = dict(model.named_modules())
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module"} if graph is not None else {}
    rows, claimed = [], set()
    bar = Progress(len(choices), 0, progress, 1, True)
    for index, choice in enumerate(choices):
        if index:
            bar.update(index, f"{rows[-1].fqn}: +{100 * rows[-1].gain:.2f}% kept magnitude")
        layer_pattern = choice.patterns[0]
        weight = choice.module.weight
        if len(set(choice.patterns)) != 1 or not isinstance(layer_pattern, NMPattern) or layer_pattern.axis != "in":
            rows.append(LayerPermutation(choice.fqn, None, 0.0, 0.0, "only single n:m patterns along input channels"))
            continue
        if choice.fqn in pairs:
            rows.append(_fold_decoder_pair(choice.fqn, pairs[choice.fqn], modules, layer_pattern, max_sweeps))
            continue
        if graph is None:
            rows.append(LayerPermutation(choice.fqn, None, 0.0, 0.0, untraced))
            continue
        before = kept_magnitude(weight, layer_pattern)
        node = nodes.get(choice.fqn)
        if node is None or (isinstance(choice.module, nn.Conv2d) and choice.module.groups != 1):
            rows.append(
                LayerPermutation(choice.fqn, None, before, before, "not a plain layer call in the traced graph")
            )
            continue
        producer, norms, reason = _producer_chain(node, modules)
        if producer is not None and producer in claimed:
            producer, reason = None, "producer already permuted for another layer"
        if producer is None and unfoldable == "skip":
            rows.append(LayerPermutation(choice.fqn, None, before, before, reason))
            continue
        result = search_permutation(weight, layer_pattern, max_sweeps)
        if result.after <= result.before:
            rows.append(LayerPermutation(choice.fqn, None, before, before, "no swap raised the kept magnitude"))
            continue
        if producer is None:  # residual or shared input: gather the input channels instead
            choice.module.weight.data = choice.module.weight.data[:, result.perm].clone()
            attach_input_map(choice.module, result.perm)
            rows.append(LayerPermutation(choice.fqn, None, result.before, result.after, reason, input_map=True))
            continue
        _permute_outputs(modules[producer], result.perm)
        for norm in norms:
            _permute_norm(modules[norm], result.perm)
        choice.module.weight.data = choice.module.weight.data[:, result.perm].clone()
        claimed.add(producer)
        rows.append(LayerPermutation(choice.fqn, producer, result.before, result.after))
    bar.update(len(choices), "done")
    bar.close()
    return rows
