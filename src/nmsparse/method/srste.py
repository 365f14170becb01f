r"""``srste``: SR-STE (Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
From Scratch", ICLR 2021, arXiv 2102.04010).

Masks are recomputed from the dense weights' magnitudes after every optimizer step; backward is
:math:`g + \lambda_W (1 - M) \odot W` (see :mod:`nmsparse.grad`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..grad import SRSTE_DEFAULT_DECAY
from .base import Method, register_method


@dataclass
class SrsteOptions:
    decay: float = field(default=SRSTE_DEFAULT_DECAY, metadata={"help": "lambda_W, decay on pruned weights"})
    update_every_steps: int = field(default=1, metadata={"help": "recompute masks every k optimizer steps"})

    def __post_init__(self) -> None:
        if self.decay < 0:
            raise ValueError(f"decay must be >= 0, got {self.decay}")
        if self.update_every_steps < 1:
            raise ValueError(f"update_every_steps must be >= 1, got {self.update_every_steps}")


@register_method("srste")
class Srste(Method):
    Options = SrsteOptions
    grad_rule = "srste"

    @property
    def decay(self) -> float:
        return self.options.decay

    def masks_due(self, step: int) -> bool:
        return step % self.options.update_every_steps == 0
