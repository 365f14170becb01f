"""Importance scores: pure functions, higher = more likely kept. Shaped like the weight unless stated.

* :func:`magnitude` -- |W| (SR-STE, ASP, one-shot magnitude pruning).
* :func:`activation_weighted` -- |W| * ||X_j||_2 per input feature j (Wanda, Sun et al. 2023).

Per-block norms of 1xN blocks (SUBP) are :func:`nmsparse.mask.block_scores`.
"""

from __future__ import annotations

import torch

__all__ = ["magnitude", "activation_weighted"]


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32 (scores never need more precision than the weights carry)."""
    return weight.detach().abs().float()


def activation_weighted(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda score S_ij = |W_ij| * ||X_j||_2.

    Args:
        weight: ``[out, in]`` or ``[out, in, kh, kw]``.
        input_norm: L2 norm of each input feature over the calibration tokens, ``[in]`` for a Linear,
            ``[in]`` or ``[in, kh, kw]`` (im2col columns) for a conv.
    """
    norm = input_norm.detach().float().to(weight.device)
    if weight.dim() > 2 and norm.dim() == 1:
        norm = norm.reshape(-1, *([1] * (weight.dim() - 2)))  # [in, 1, 1]
    return magnitude(weight) * norm.unsqueeze(0)



def relative_importance(weight: torch.Tensor, input_norm: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """RIA score (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large
    Language Models", ICLR 2024): ``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** power``,
    each weight's magnitude relative to its output row and to its input column, times the input
    norm to ``power`` (the paper's a = 0.5). A conv weight's column is one im2col column
    (input channel and kernel position), as for :func:`activation_weighted`.

    Args:
        weight: ``[out, in]`` or ``[out, in, kh, kw]``.
        input_norm: as for :func:`activation_weighted`.
        power: exponent of the input norm.
    """
    w = magnitude(weight).reshape(weight.shape[0], -1).float()
    tiny = torch.finfo(torch.float32).tiny
    relative = w / w.sum(1, keepdim=True).clamp_min(tiny) + w / w.sum(0, keepdim=True).clamp_min(tiny)
    norm = input_norm.detach().float().to(weight.device)
    if weight.dim() > 2 and norm.dim() == 1:
        norm = norm.repeat_interleave(w.shape[1] // norm.numel())  # [in] -> [in * kh * kw]
    return (relative * norm.reshape(1, -1) ** power).reshape(weight.shape)
