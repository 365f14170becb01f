"""Attach and remove mask parametrizations on any module, without editing its class.

:class:`MaskedWeight` is registered with :func:`torch.nn.utils.parametrize.register_parametrization`;
``module.weight`` then evaluates to the masked weight under the layer's gradient rule, and the
dense weight lives in ``module.parametrizations.weight.original``. The mask is a non-persistent
buffer: the :class:`~nmsparse.sparsifier.Sparsifier` owns it (and saves it in its own state_dict),
so the model's state_dict keeps only real parameters.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from .grad import GRADIENT_RULES, add_decay_, apply_rule

__all__ = ["MaskParametrization", "MaskedWeight", "attach", "is_attached", "dense_weight", "squash_module",
           "get_parametrization", "attach_input_map", "input_map"]


@runtime_checkable
class MaskParametrization(Protocol):
    """What the Sparsifier needs of a parametrization it attaches (MaskedWeight, a learned mask).

    Attributes:
        rule: gradient rule name (``"ste"``, ``"srste"``, ``"masked"``, or the method's own, e.g. ``"learned"``).
        decay: lambda_W of the ``srste`` rule.
        dense_factor: the factor of pruned weights in the next forward (0 = hard mask).
    """

    rule: str
    decay: float
    dense_factor: float

    @property
    def mask(self) -> torch.Tensor:
        """Bool mask shaped like the weight, True = kept."""
        ...

    @property
    def keep(self) -> torch.Tensor:
        """The mask as 0/1 in the weight's dtype."""
        ...

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (a no-op where the mask is derived from trained parameters)."""
        ...


class MaskedWeight(nn.Module):
    """Parametrization W -> W * (mask + (1 - mask) * dense_factor) with a gradient rule.

    Args:
        mask: bool mask shaped like the weight, True = kept.
        rule: gradient rule, see :mod:`nmsparse.grad`.
        decay: lambda_W of the ``srste`` rule.

    Once :meth:`bind` ties it to its dense parameter (``attach`` does), the ``srste`` rule's decay
    term is added to ``param.grad`` in place as the gradient accumulates (a post-accumulate-grad
    hook) and the forward's own backward is plain STE: the same update, without a second
    weight-sized gradient tensor allocated in every backward. ``torch.autograd.grad`` does not
    accumulate into ``.grad``, so it returns the STE part only there (use
    :func:`nmsparse.grad.srste` directly for the full rule as a differentiable function).
    """

    def __init__(self, mask: torch.Tensor, rule: str = "masked", decay: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rule not in GRADIENT_RULES:
            raise ValueError(f"unknown gradient rule {rule!r}; expected one of {', '.join(GRADIENT_RULES)}")
        # Stored as 0/1 in the weight's dtype: the forward multiply is ~3x faster than with a bool.
        self.register_buffer("keep", mask.to(dtype), persistent=False)
        self.rule = rule
        self.decay = float(decay)
        self.dense_factor = 0.0
        self._decay_hook: RemovableHandle | None = None

    @property
    def mask(self) -> torch.Tensor:
        """The bool mask (True = kept)."""
        return self.keep.bool()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        self.keep.copy_(mask)

    def bind(self, param: torch.Tensor) -> None:
        """Add the ``srste`` decay to ``param.grad`` as it accumulates (``param``: the dense weight)."""
        if self._decay_hook is None and param.is_leaf and param.requires_grad:
            self._decay_hook = param.register_post_accumulate_grad_hook(self._add_decay)

    def release(self) -> None:
        """Undo :meth:`bind` (before the parametrization is removed)."""
        if self._decay_hook is not None:
            self._decay_hook.remove()
            self._decay_hook = None

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) is not bound to any parameter: its forward keeps the full rule
        state = self.__dict__.copy()
        state["_decay_hook"] = None
        return state

    def _add_decay(self, param: torch.Tensor) -> None:
        if self.rule == "srste" and self.decay and param.grad is not None:
            add_decay_(param.grad, param, self.keep, self.decay)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rule = "ste" if self.rule == "srste" and self._decay_hook is not None else self.rule
        return apply_rule(rule, weight, self.keep, self.dense_factor, self.decay)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, decay={self.decay:g}, dense_factor={self.dense_factor:g}"


def attach(module: nn.Module, parametrization: nn.Module, name: str = "weight") -> None:
    """Register ``parametrization`` on ``module.<name>`` (unsafe=False keeps shape checks on)."""
    if is_attached(module, name):
        raise RuntimeError(f"{type(module).__name__}.{name} already has a parametrization; call squash first")
    parametrize.register_parametrization(module, name, parametrization)
    if isinstance(parametrization, MaskedWeight):
        parametrization.bind(module.parametrizations[name].original)


def is_attached(module: nn.Module, name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, name)


def get_parametrization(module: nn.Module, name: str = "weight") -> nn.Module:
    return module.parametrizations[name][0]


def dense_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The dense (unmasked) weight tensor, parametrized or not."""
    if is_attached(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


@torch.no_grad()
def squash_module(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Bake ``mask`` into the weight (pruned entries become exact zeros) and drop the parametrization."""
    param = get_parametrization(module, name)
    if isinstance(param, MaskedWeight):
        param.release()
    # leave_parametrized=False hands back the original dense Parameter itself: mask it in place
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    weight = getattr(module, name)
    weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


# ------------------------------------------------------------------------------ input index maps
_INPUT_MAP = "_nmsparse_input_perm"


def _gather_hook(module: nn.Module, args: tuple) -> tuple:
    perm = getattr(module, _INPUT_MAP)
    x = args[0]
    dim = 1 if isinstance(module, nn.Conv2d) else x.dim() - 1
    return (x.index_select(dim, perm.to(x.device)),) + tuple(args[1:])


def attach_input_map(module: nn.Module, perm: torch.Tensor | list[int]) -> None:
    """Make ``module`` read its input channels in the order ``perm`` (a forward pre-hook).

    Used where a channel permutation cannot be folded into the producing layer
    (:func:`nmsparse.permute.permute_channels`); the map travels in the manifest entry.
    """
    if getattr(module, _INPUT_MAP, None) is not None:
        raise ValueError("this layer already has an input index map")
    setattr(module, _INPUT_MAP, torch.as_tensor(perm, dtype=torch.long))
    module.register_forward_pre_hook(_gather_hook)


def input_map(module: nn.Module) -> list[int] | None:
    """The layer's input index map, if it has one."""
    perm = getattr(module, _INPUT_MAP, None)
    return None if perm is None else [int(i) for i in perm]
