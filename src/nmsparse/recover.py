"""Recovery after one-shot pruning: short distillation from the dense teacher with masks held fixed."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import run_model
from .progress import Progress
from .select import Rule, Selection
from .sparsifier import Sparsifier

__all__ = ["recover"]


def _main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = getattr(out, "logits", None)
    return hidden if hidden is not None else out[0]


def recover(
    student: nn.Module,
    teacher: nn.Module,
    layers: list[dict[str, Any]],
    batches: list[Any],
    steps: int | None = None,
    max_seconds: float | None = None,
    lr: float = 1e-4,
    progress: str = "auto",
    objective: str = "hidden",
) -> dict[str, Any]:
    """Fine-tune ``student`` to match ``teacher``'s outputs (hidden states or logits), masks fixed.

    Args:
        student: the pruned model (dense with zeros).
        teacher: the dense original (frozen).
        layers: manifest entries of the pruned layers; their patterns are held exactly.
        batches: training inputs (cycled).
        steps: optimizer steps budget; ``max_seconds``: wall-clock budget (either or both).
        lr: AdamW learning rate.
        objective: ``hidden`` -- MSE between output hidden states (or logits) over real tokens;
            ``pooled`` -- 1 - cosine between mean-pooled outputs (sentence embeddings), which is
            what sentence-embedding models are used for.

    Returns:
        ``{"steps", "seconds", "first_loss", "last_loss"}``; the student is squashed again.
    """
    if not steps and not max_seconds:
        raise ValueError("recovery needs a step or time budget")
    if objective not in ("hidden", "pooled"):
        raise ValueError(f"recovery objective must be 'hidden' or 'pooled', got {objective!r}")
    rules = tuple(
        Rule(e["fqn"], slices=tuple(e["pattern"].split(","))) if "," in e["pattern"] else Rule(e["fqn"], pattern=e["pattern"])
        for e in layers
    ) + (Rule("re:.*", skip=True),)
    # magnitude masks of a dense-with-zeros weight are exactly its non-zeros: the pattern is held
    sparsifier = Sparsifier("magnitude", "2:4", Selection(layers=(), rules=rules))
    sparsifier.prepare(student)
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = steps or 10**9
    bar = Progress(steps or 0, 0, progress, every=max(1, (steps or 100) // 10))
    start, step, first, last = time.perf_counter(), 0, None, None
    while step < total and (max_seconds is None or time.perf_counter() - start < max_seconds):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = _main_output(run_model(teacher, batch)).float()
        output = _main_output(run_model(student, batch)).float()
        if objective == "pooled" and output.dim() == 3:
            weights = batch["attention_mask"].unsqueeze(-1).to(output.dtype) if isinstance(batch, dict) else None
            if weights is None:
                weights = torch.ones_like(output[..., :1])
            pooled_s = (output * weights).sum(1) / weights.sum(1)
            pooled_t = (target * weights).sum(1) / weights.sum(1)
            loss = (1.0 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean()
        elif isinstance(batch, dict) and "attention_mask" in batch and output.dim() == 3:
            weights = batch["attention_mask"].unsqueeze(-1).to(output.dtype)
            loss = ((output - target) ** 2 * weights).sum() / (weights.sum() * output.shape[-1])
        else:
            loss = F.mse_loss(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        first = value if first is None else first
        last = value
        step += 1
        bar.update(step, f"distill loss {value:.5f}")
    bar.close()
    student.eval()
    sparsifier.squash()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "first_loss": first, "last_loss": last}
