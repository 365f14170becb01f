r"""Gradient rules: what backward does with pruned weights. The only custom autograd Functions.

All rules share one forward, :math:`\tilde W = W \odot (M + (1 - M)\,d)`, where M is the bool mask
and d in [0, 1] the *dense factor* of pruned weights (d = 0: hard mask; d = 1: dense; in between:
the decaying masks of progressive gradient flow, Bambhaniya et al. 2024).

* ``ste``: :math:`\partial L/\partial W = \partial L/\partial \tilde W` -- the gradient taken at the
  sparse weights is applied to every dense weight (straight-through estimator).
* ``srste``: :math:`\partial L/\partial W = \partial L/\partial \tilde W + \lambda_W (1 - M) \odot W`
  -- SR-STE (Zhou et al., ICLR 2021, arXiv 2102.04010): STE plus a decay on the pruned weights
  only, which reduces mask flipping. The paper's default :math:`\lambda_W = 2 \cdot 10^{-4}`.
* ``masked``: the true gradient of the forward,
  :math:`\partial L/\partial W = \partial L/\partial \tilde W \odot (M + (1 - M) d)`; with d = 0 pruned
  weights receive no gradient (fixed-mask fine-tuning, ASP). With a decay :math:`\lambda_W > 0` pruned
  weights get only :math:`\lambda_W (1 - M) \odot W` (SUBP's hard mode, HUBP: the loss gradient is
  masked, the decay still pulls pruned weights toward zero).

With fp16 loss scaling the srste term would be added to a scaled gradient; nmsparse trains in bf16
autocast (no loss scaling), where the rule is exact.
"""

from __future__ import annotations

import torch

__all__ = ["GRADIENT_RULES", "SRSTE_DEFAULT_DECAY", "add_decay_", "apply_rule", "ste", "srste", "masked"]

SRSTE_DEFAULT_DECAY = 2e-4
GRADIENT_RULES = ("ste", "srste", "masked")


def _keep(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # multiplying by a float mask of the weight's dtype is ~3x faster than by a bool one
    return mask if mask.dtype == weight.dtype else mask.to(weight.dtype)


def _forward_value(weight: torch.Tensor, mask: torch.Tensor, dense_factor: float) -> torch.Tensor:
    keep = _keep(weight, mask)
    if dense_factor == 0.0:
        return weight * keep
    return weight * (keep + (1.0 - keep) * dense_factor)


class _StraightThrough(torch.autograd.Function):
    """Forward W * (M + (1 - M) d); backward g + decay * (1 - M) * W (decay = 0 is plain STE)."""

    @staticmethod
    def forward(ctx, weight, mask, dense_factor, decay):  # type: ignore[override]
        ctx.decay, ctx.dense_factor = float(decay), float(dense_factor)
        out = _forward_value(weight, mask, ctx.dense_factor)
        if ctx.decay:
            # with d = 0, (1 - M) * W = W - out: no mask needed in backward, and out is kept alive anyway
            ctx.save_for_backward(weight, out if ctx.dense_factor == 0.0 else _keep(weight, mask))
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.decay:
            return grad_out, None, None, None
        weight, saved = ctx.saved_tensors
        if ctx.dense_factor == 0.0:
            # W - out is exactly W on pruned entries and exactly 0 on kept ones; one fused pass on
            # the CPU (numba) where torch needs two, the difference a temporary of the weight's size
            from ._topk_cpu import decay_grad

            grad = decay_grad(grad_out, weight, saved, ctx.decay)
            if grad is None:
                grad = torch.add(grad_out, weight - saved, alpha=ctx.decay)
        else:
            grad = torch.addcmul(grad_out, weight, 1.0 - saved, value=ctx.decay)
        return grad, None, None, None


@torch.no_grad()
def add_decay_(grad: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, decay: float) -> torch.Tensor:
    r"""``grad += decay * (1 - keep) * weight`` in place: SR-STE's decay term added to an accumulated
    gradient (``keep`` is the 0/1 mask). One fused pass on the CPU (the C++ mask kernels, else
    numba), two in torch; no temporary either way."""
    from ._topk_cpu import decay_into

    if not decay_into(grad, weight, keep, decay):
        grad.add_(weight, alpha=decay).addcmul_(weight, keep.to(grad.dtype), value=-decay)
    return grad


def ste(weight: torch.Tensor, mask: torch.Tensor, dense_factor: float = 0.0) -> torch.Tensor:
    return _StraightThrough.apply(weight, mask, dense_factor, 0.0)


def srste(
    weight: torch.Tensor, mask: torch.Tensor, dense_factor: float = 0.0, decay: float = SRSTE_DEFAULT_DECAY
) -> torch.Tensor:
    return _StraightThrough.apply(weight, mask, dense_factor, decay)


class _MaskedDecay(torch.autograd.Function):
    """Forward W * M; backward g * M + decay * (1 - M) * W (SUBP's hard mode)."""

    @staticmethod
    def forward(ctx, weight, mask, decay):  # type: ignore[override]
        ctx.decay = float(decay)
        keep = _keep(weight, mask)
        ctx.save_for_backward(weight, keep)
        return weight * keep

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        weight, keep = ctx.saved_tensors
        return grad_out * keep + ctx.decay * weight * (1.0 - keep), None, None


def masked(weight: torch.Tensor, mask: torch.Tensor, dense_factor: float = 0.0, decay: float = 0.0) -> torch.Tensor:
    if decay and dense_factor == 0.0:
        return _MaskedDecay.apply(weight, mask, decay)
    # Plain autograd already gives the masked rule: d/dW [W * c] = c.
    return _forward_value(weight, mask, dense_factor)


def apply_rule(
    rule: str, weight: torch.Tensor, mask: torch.Tensor, dense_factor: float = 0.0, decay: float = 0.0
) -> torch.Tensor:
    """Apply gradient rule ``rule`` (one of :data:`GRADIENT_RULES`).

    Args:
        rule: ``"ste"``, ``"srste"`` or ``"masked"``.
        weight: the dense weight W.
        mask: bool mask, True = kept, shaped like ``weight``.
        dense_factor: d, the factor pruned weights are multiplied by in the forward.
        decay: lambda_W of ``srste``, and of ``masked`` at d = 0 (SUBP's hard mode); ignored by ``ste``.
    """
    if rule == "srste":
        return srste(weight, mask, dense_factor, decay)
    if rule == "ste":
        return ste(weight, mask, dense_factor)
    if rule == "masked":
        return masked(weight, mask, dense_factor, decay)
    raise ValueError(f"unknown gradient rule {rule!r}; expected one of {', '.join(GRADIENT_RULES)}")
