"""Fold what follows a sparse layer into its kernel: batch norm into the packed weight, ReLU into the store.

An inference runtime should not pay a separate pass over the activations for an eval-mode
BatchNorm2d (a per-channel scale and shift) or a ReLU right after a layer. :func:`fuse` finds, for
every :class:`~nmsparse.runtime.modules.SparseConv2d` / :class:`~nmsparse.runtime.modules.SparseLinear`
of a model, the chain that consumes its output and nothing else:

* ``SparseConv2d -> BatchNorm2d`` (eval mode, running statistics): the scale goes into the packed
  values of each output row (the zeros stay zeros, so the pattern is unchanged) and the shift into
  the bias;
* then (or directly) ``-> ReLU``: the kernel applies ``max(., 0)`` as it stores the output
  (the 1xN kernels in C++; the others with one in-place op).

``nn.Identity`` modules on the way (timm's empty drop-block / anti-alias slots) are passed over.
The absorbed modules are replaced by ``nn.Identity``, as ``torch.ao.quantization.fuse_modules``
does, so the model keeps its class and its forward. The dataflow comes from a ``torch.fx`` trace
(sparse modules as leaves); a model that does not trace (data-dependent control flow) is left as
it is, and the result says why. Only modules called exactly once, with the previous output as
their only argument, are absorbed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from .formats import BlockPacked, NMPacked
from .modules import SparseConv2d, _PackedModule

__all__ = ["FuseResult", "fuse", "scale_rows"]


@dataclass
class FuseResult:
    """``fused``: ``{sparse layer fqn: [absorbed module fqns]}``; ``reason``: why nothing was tried."""

    fused: dict[str, list[str]] = field(default_factory=dict)
    reason: str = ""


class _SparseLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _PackedModule) or super().is_leaf_module(m, module_qualified_name)


def scale_rows(packed: BlockPacked | NMPacked, scale: np.ndarray) -> None:
    """Multiply output row ``o`` of a packed weight by ``scale[o]``, in place."""
    scale = np.asarray(scale, dtype=np.float32)
    if isinstance(packed, BlockPacked):
        rows, _, block = packed.vals.shape
        packed.vals *= scale.reshape(rows, 1, block)
        return
    out, at = packed.shape[0], 0
    for width in packed._widths():  # chunk-major: each chunk holds [out, width] values
        packed.vals[at: at + out * width].reshape(out, width)[...] *= scale[:, None]
        at += out * width


def _foldable_bn(module: nn.Module) -> bool:
    return (isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats
            and module.running_mean is not None and module.running_var is not None)


@torch.no_grad()
def _fold_bn(layer: _PackedModule, bn: nn.BatchNorm2d) -> None:
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    scale = (bn.weight.double() if bn.weight is not None else torch.ones_like(std)) / std
    shift = (bn.bias.double() if bn.bias is not None else torch.zeros_like(std)) - bn.running_mean.double() * scale
    scale_rows(layer.packed, scale.numpy())
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    layer.bias = nn.Parameter(bias.float().contiguous(), requires_grad=False)


def _chains(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[str, list[tuple[str, str]]]:
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    chains: dict[str, list[tuple[str, str]]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or not isinstance(modules[node.target], _PackedModule):
            continue
        absorbed: list[tuple[str, str]] = []
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if (user.op != "call_module" or calls[user.target] != 1 or user.kwargs or len(user.args) != 1
                    or user.args[0] is not current):
                break
            module = modules[user.target]
            if isinstance(module, nn.Identity):
                current = user
                continue
            if (not absorbed and isinstance(modules[node.target], SparseConv2d) and _foldable_bn(module)
                    and module.num_features == modules[node.target].out_channels):
                absorbed.append(("bn", user.target))
                current = user
                continue
            if isinstance(module, nn.ReLU):
                absorbed.append(("relu", user.target))
            break
        if absorbed:
            chains[node.target] = absorbed
    return chains


@torch.no_grad()
def fuse(model: nn.Module) -> FuseResult:
    """Fold eval-mode batch norms and ReLUs that follow sparse layers into them (in place)."""
    try:
        graph = _SparseLeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: leave the model as it is
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        return FuseResult(reason=f"not traceable with torch.fx ({type(exc).__name__}: {first})")
    modules = dict(model.named_modules())
    result = FuseResult()
    for fqn, chain in _chains(graph, modules).items():
        layer = modules[fqn]
        for kind, target in chain:
            if kind == "bn":
                _fold_bn(layer, modules[target])  # type: ignore[arg-type]
            else:
                layer.activation = "relu"
            model.set_submodule(target, nn.Identity())
        result.fused[fqn] = [target for _, target in chain]
    return result
