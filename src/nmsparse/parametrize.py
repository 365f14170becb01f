"""Attach and remove mask parametrizations on any module, without editing its class.

:class:`MaskedWeight` is registered with :func:`torch.nn.utils.parametrize.register_parametrization`;
``module.weight`` then evaluates to the masked weight under the layer's gradient rule, and the
dense weight lives in ``module.parametrizations.weight.original``. The mask is a non-persistent
buffer: the :class:`~nmsparse.sparsifier.Sparsifier` owns it (and saves it in its own state_dict),
so the model's state_dict keeps only real parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .grad import GRADIENT_RULES, apply_rule

__all__ = ["MaskedWeight", "attach", "is_attached", "dense_weight", "squash_module", "get_parametrization"]


class MaskedWeight(nn.Module):
    """Parametrization W -> W * (mask + (1 - mask) * dense_factor) with a gradient rule.

    Args:
        mask: bool mask shaped like the weight, True = kept.
        rule: gradient rule, see :mod:`nmsparse.grad`.
        decay: lambda_W of the ``srste`` rule.
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

    @property
    def mask(self) -> torch.Tensor:
        """The bool mask (True = kept)."""
        return self.keep.bool()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        self.keep.copy_(mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return apply_rule(self.rule, weight, self.keep, self.dense_factor, self.decay)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, decay={self.decay:g}, dense_factor={self.dense_factor:g}"


def attach(module: nn.Module, parametrization: nn.Module, name: str = "weight") -> None:
    """Register ``parametrization`` on ``module.<name>`` (unsafe=False keeps shape checks on)."""
    if is_attached(module, name):
        raise RuntimeError(f"{type(module).__name__}.{name} already has a parametrization; call squash first")
    parametrize.register_parametrization(module, name, parametrization)


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
    # leave_parametrized=False hands back the original dense Parameter itself: mask it in place
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    weight = getattr(module, name)
    weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))
