"""The one place epochs become optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.epochs import options_in_steps
from ..config.sections import Config
from ..schedule import Constant, Cosine, StepDecay, WarmupThen

__all__ = ["StepPlan", "make_plan", "lr_schedule", "options_in_steps"]


@dataclass(frozen=True)
class StepPlan:
    """A training run in optimizer steps (not a method's :class:`~nmsparse.method.base.Plan` of masks)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr_milestones: tuple[int, ...]


def make_plan(config: Config, steps_per_epoch: int) -> StepPlan:
    total = steps_per_epoch * config.train.epochs
    if config.train.max_steps is not None:
        total = min(total, config.train.max_steps)
    return StepPlan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=config.lr.warmup_epochs * steps_per_epoch,
        lr_milestones=tuple(e * steps_per_epoch for e in config.lr.step_epochs),
    )


def lr_schedule(config: Config, plan: StepPlan):
    """Learning rate as a pure function of the optimizer step."""
    peak, lr = config.optim.lr, config.lr
    full = plan.steps_per_epoch * config.train.epochs  # the schedule spans the configured epochs
    if lr.schedule == "cosine":
        after = Cosine(peak, lr.min_lr, plan.warmup_steps, full)
    elif lr.schedule == "step":
        after = StepDecay(peak, plan.lr_milestones, lr.gamma)
    else:
        after = Constant(peak)
    return WarmupThen(after, plan.warmup_steps) if plan.warmup_steps else after

