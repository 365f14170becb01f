"""Recovery after one-shot pruning: short distillation from the dense teacher with masks held fixed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..env import autocast, resolve_precision
from ..method import MethodError
from ..models import main_output, run_model
from ..progress import Progress
from ..schedule import Constant, Cosine
from ..select import Rule, Selection
from ..sparsifier import Sparsifier
from .fidelity import mean_pool, model_kind

__all__ = ["Recovery", "recover", "distil", "OBJECTIVES"]


@dataclass
class Recovery:
    """Distillation from the dense model after pruning, masks held (:func:`nmsparse.oneshot.recover`).

    Args:
        batches: training inputs (cycled), of the same form as calibration batches.
        steps / seconds: step and/or wall-clock budget (at least one).
        lr: peak AdamW learning rate (cosine decay over the budget).
        objective: see :func:`nmsparse.oneshot.recover` (``auto`` picks by model kind).
        precision: see :func:`nmsparse.oneshot.recover` (``auto``: bfloat16 where the device multiplies
            it natively).
    """

    batches: list[Any]
    steps: int | None = None
    seconds: float | None = None
    lr: float = 2e-4
    objective: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if not self.steps and not self.seconds:
            raise ValueError("recovery needs a step or time budget (steps= or seconds=)")

    @classmethod
    def of(cls, config: Any, batches: list[Any] | None) -> Recovery:
        """The recovery a :class:`~.config.PruneConfig` asks for, training on ``batches``."""
        if not batches:
            raise MethodError("recovery needs training batches: give calibration= (a model in memory trains on "
                              "them) or recover=Recovery(batches, ...)")
        minutes = config.recover_minutes
        return cls(batches, config.recover_steps, minutes * 60 if minutes else None, config.recover_lr,
                   config.recover_objective, config.recover_precision)


OBJECTIVES = ("auto", "hidden", "pooled", "layers", "causal")
_RESOLUTION = 100_000  # the learning-rate schedule runs over the budget's fraction in these steps


def _token_weights(batch: Any, output: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]`` weights of real tokens (the attention mask), ones without one."""
    if isinstance(batch, dict) and "attention_mask" in batch:
        return batch["attention_mask"].unsqueeze(-1).to(output.dtype)
    return torch.ones_like(output[..., :1])


def _pooled_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(mean_pool(student, weights), mean_pool(teacher, weights), dim=-1)).mean()


def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the real tokens' features."""
    return ((student - teacher) ** 2 * weights).sum() / (weights.sum() * teacher.shape[-1])


def _normalised_mse(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`_masked_mse` divided by the teacher's mean square (each layer counts alike)."""
    scale = (teacher**2 * weights).sum() / (weights.sum() * teacher.shape[-1])
    return _masked_mse(student, teacher, weights) / scale.clamp_min(1e-12)


def _hidden_layers_loss(batch: Any, student_out: Any, teacher_out: Any, output: torch.Tensor) -> torch.Tensor:
    """Mean over layers of each hidden state's MSE divided by the teacher's mean square."""
    s_states, t_states = student_out.hidden_states, teacher_out.hidden_states
    weights = _token_weights(batch, output)
    return sum(_normalised_mse(hs.float(), ht.float(), weights) for hs, ht in zip(s_states, t_states)) / len(s_states)


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the distributions over the last axis (next-token distributions of a
    causal LM, class distributions of a classifier), averaged over the positions, or over the real
    tokens where ``weights`` (``[..., 1]``, 1 for a real token) is given. The distillation objective of
    recovery and of training's ``train.distill``."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1, keepdim=True)  # [..., 1]
    if weights is None:
        return per_token.mean()
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def _loss(objective: str, batch: Any, student_out: Any, teacher_out: Any) -> torch.Tensor:
    output, target = main_output(student_out).float(), main_output(teacher_out).float()
    if objective == "causal":  # logits KL plus every layer's hidden states (held masks)
        weights = _token_weights(batch, output)
        return kl_logits(output, target, weights) + _hidden_layers_loss(batch, student_out, teacher_out, output)
    if objective == "layers":
        weights = _token_weights(batch, output)
        return _pooled_cosine_loss(output, target, weights) + _hidden_layers_loss(
            batch, student_out, teacher_out, output
        )
    if objective == "pooled" and output.dim() == 3:
        return _pooled_cosine_loss(output, target, _token_weights(batch, output))
    if output.dim() == 3:
        return _masked_mse(output, target, _token_weights(batch, output))
    return F.mse_loss(output, target)


def _forward(model: nn.Module, batch: Any, hidden_states: bool) -> Any:
    if hidden_states:
        return run_model(model, batch, output_hidden_states=True)
    return run_model(model, batch)


def resolve_objective(student: nn.Module, batches: list[Any], objective: str, steps: int | None,
               max_seconds: float | None, schedule: str) -> str:
    """The recovery's arguments checked, and ``auto`` resolved to the objective it runs."""
    if not steps and not max_seconds:
        raise ValueError("recovery needs a step or time budget")
    if objective not in OBJECTIVES:
        raise ValueError(f"recovery objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"recovery schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not batches:
        raise ValueError("recovery needs at least one training batch")
    masked_text = isinstance(batches[0], dict) and "attention_mask" in batches[0]
    if objective == "auto":
        objective = "causal" if model_kind(student) == "causal_lm" else ("layers" if masked_text else "hidden")
    if objective in ("layers", "causal") and not isinstance(batches[0], dict):
        raise ValueError("recovery objective 'layers' needs a Hugging Face model called with keyword inputs "
                         "(it reads output_hidden_states); use 'hidden' or 'pooled'")
    return objective


def _hold_masks(student: nn.Module, layers: list[dict[str, Any]]) -> Sparsifier:
    """A Sparsifier holding the pruned layers' patterns during training: magnitude masks of a
    dense-with-zeros weight are exactly its non-zeros."""
    rules = tuple(
        Rule(e["fqn"], slices=tuple(e["pattern"].split(",")))
        if "," in e["pattern"]
        else Rule(e["fqn"], pattern=e["pattern"])
        for e in layers
    ) + (Rule("re:.*", skip=True),)
    sparsifier = Sparsifier("magnitude", "2:4", Selection(layers=(), rules=rules))
    sparsifier.prepare(student)
    return sparsifier


def _step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, objective: str,
          hidden_states: bool, forward_context: Any) -> float:
    """One distillation step on ``batch``, its forward passes in ``forward_context`` (autocast, whose docs
    keep the backward pass outside it; the losses themselves are taken in float32, ``_loss``); its loss."""
    with forward_context:
        with torch.no_grad():
            teacher_out = _forward(teacher, batch, hidden_states)
        loss = _loss(objective, batch, _forward(student, batch, hidden_states), teacher_out)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def recover(
    student: nn.Module,
    teacher: nn.Module,
    layers: list[dict[str, Any]],
    batches: list[Any],
    steps: int | None = None,
    max_seconds: float | None = None,
    lr: float = 2e-4,
    progress: str = "auto",
    objective: str = "auto",
    dropout: bool = False,
    schedule: str = "cosine",
    precision: str = "auto",
) -> dict[str, Any]:
    """Fine-tune ``student`` to match ``teacher``'s outputs (hidden states or logits), masks fixed.

    Args:
        student: the pruned model (dense with zeros).
        teacher: the dense original (frozen).
        layers: manifest entries of the pruned layers; their patterns are held exactly.
        batches: training inputs (cycled).
        steps: optimizer steps budget; ``max_seconds``: wall-clock budget (either or both).
        lr: peak AdamW learning rate.
        objective: ``hidden`` -- MSE between output hidden states (or logits) over real tokens;
            ``pooled`` -- 1 - cosine between mean-pooled outputs (sentence embeddings);
            ``layers`` -- ``pooled`` plus the MSE of every layer's hidden states, each divided by
            the teacher's mean square (Hugging Face models: ``output_hidden_states``);
            ``causal`` -- KL(teacher || student) of the next-token distributions plus the
            ``layers`` hidden-state term (causal language models);
            ``auto`` -- ``causal`` for causal LMs, ``layers`` for other models called with an
            attention mask, else ``hidden``.
        dropout: keep the student's dropout active (off by default: the target is the teacher's
            deterministic output, and dropout noise slows the match down).
        schedule: ``cosine`` decay of the learning rate to 0 over the budget (by time when only
            ``max_seconds`` is given), or ``constant``.
        precision: ``bf16`` -- student and teacher run their products in bfloat16 under
            ``torch.autocast`` (weights, optimizer state, losses and masks stay float32: mixed precision);
            ``fp32``; ``auto`` -- :func:`nmsparse.env.resolve_precision` (``bf16`` where the device multiplies it
            natively: 1.6x the steps a minute for SmolLM2 on an AVX512-BF16 CPU).

    Returns:
        ``{"steps", "seconds", "first_loss", "last_loss", "objective", "precision", "history"}`` (``history``: the loss
        curve, ``{"step", "seconds", "loss"}`` lists of at most 200 points); the student is squashed again.
    """
    objective = resolve_objective(student, batches, objective, steps, max_seconds, schedule)
    sparsifier = _hold_masks(student, layers)
    params = [p for p in student.parameters() if p.requires_grad]
    stats = distil(student, teacher, params, batches, objective, steps, max_seconds, lr, progress, dropout, schedule,
                   precision)
    sparsifier.squash()
    return stats


def distil(student: nn.Module, teacher: nn.Module, params: list[torch.Tensor], batches: list[Any], objective: str,
           steps: int | None, max_seconds: float | None, lr: float, progress: str = "auto", dropout: bool = False,
           schedule: str = "cosine", precision: str = "auto") -> dict[str, Any]:
    """The distillation loop of :func:`recover` and of scale tuning (:mod:`.tune`): AdamW on ``params``
    (the learning rate decayed over the step or time budget), ``objective`` already resolved; the student
    is left in eval mode. Returns the stats :func:`recover` documents."""
    device = next(student.parameters()).device
    precision = resolve_precision(precision, device)
    teacher.eval()
    student.train(dropout)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = steps or 10**9
    bar = Progress(steps or 0, 0, progress, every=max(1, (steps or 100) // 10), budget_seconds=max_seconds)
    history: list[tuple[int, float, float]] = []  # (step, seconds, loss)
    hidden_states = objective in ("layers", "causal")
    lr_at = Cosine(lr, 0.0, 0, _RESOLUTION) if schedule == "cosine" else Constant(lr)
    start, step, first, last = time.perf_counter(), 0, None, None
    while step < total:
        elapsed = time.perf_counter() - start
        if max_seconds is not None and elapsed >= max_seconds:
            break
        done = max(step / total if steps else 0.0, elapsed / max_seconds if max_seconds else 0.0)
        for group in optimizer.param_groups:  # the schedule runs over the fraction of the budget used
            group["lr"] = lr_at(round(min(1.0, done) * _RESOLUTION))
        value = _step(student, teacher, optimizer, batches[step % len(batches)], objective, hidden_states,
                      autocast(device, precision))
        first = value if first is None else first
        last = value
        step += 1
        history.append((step, time.perf_counter() - start, value))
        bar.update(step, f"loss {value:.5f}")
    bar.close()
    student.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "first_loss": first, "last_loss": last,
            "objective": objective, "precision": precision, "history": _thin(history)}


def _thin(history: list[tuple[int, float, float]], points: int = 200) -> dict[str, list[float]]:
    """The loss curve for the report: every step, or ``points`` evenly spaced ones (the last kept)."""
    if len(history) > points:
        keep = sorted({round(i * (len(history) - 1) / (points - 1)) for i in range(points)})
        history = [history[i] for i in keep]
    return {"step": [h[0] for h in history], "seconds": [round(h[1], 2) for h in history],
            "loss": [round(h[2], 6) for h in history]}
