r"""``block_1xn``: soft uniform 1xN block pruning (SUBP; Xiang et al., NeurIPS 2023).

A 1xN block is N consecutive output channels x 1 input channel x the whole kernel; every block row
(N output channels) keeps the same number of blocks, so CPU threads owning block rows get equal
work. The pattern is written ``1xN:density`` (e.g. ``1x16:0.25`` keeps a quarter of the blocks).

Every ``update_every_steps`` optimizer steps (once per epoch in SUBP; ``nmsparse train`` converts
``update_every_epochs`` and ``ramp_*_epoch`` at the config edge), at step t, per block row with
:math:`C_{in}` blocks and final prune rate p:

1. score the blocks (``l1``, ``l2`` or ``bpar``), of the currently masked weights by default (SUBP's
   V2; ``score_masked: false`` scores the raw weights, V1);
2. prune the ``int(p * C_in)`` lowest-scoring blocks (the *final* rate);
3. regrow ``R = int((p - p_e) * C_in)`` of them (the float products truncated, exactly as SUBP's code
   computes both counts), :math:`p_t = p\,\rho(t)`, by importance
   sampling without replacement with probabilities :math:`\mathrm{softmax}(u / \tau)`, u the
   L2-normalised ascending scores of the pruned blocks; :math:`\rho` ramps from 0 at
   ``ramp_start_step`` to 1 at ``ramp_end_step`` (linear, cos, saturating_exp or cubic: the seed's curves as
   :mod:`nmsparse.schedule` objects).

``soft`` mode (SUBP) trains pruned weights straight-through with the SR-STE decay
:math:`\lambda (1 - M) \odot W` (exact here: nmsparse trains without fp16 loss scaling). ``hard`` mode
(HUBP) masks the loss gradient; as in SUBP's HUBP, pruned weights still get the decay
:math:`\lambda (1 - M) \odot W` (``hard_decay: true``, the default), or no gradient at all with
``hard_decay: false``. BPAR (block pruning via angular redundancy) scores :math:`S = a - \alpha b`:
a the block's share of the row's L1 norm (of the masked weights with ``score_masked``, SUBP's V2; of
the raw weights without, V1), b its share of the row's summed absolute cosine similarity between
blocks under the current mask (both variants: pruned blocks are zero vectors and count 1), so small
blocks that point the same way as many others go first.

Sampling is seeded by (seed, update index, layer): runs and resumes are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..grad import SRSTE_DEFAULT_DECAY
from ..mask import block_scores, expand_block_mask
from ..pattern import BlockPattern
from ..schedule import Constant, Power, SaturatingExp, Schedule, SineIn
from .base import Layers, LayerState, Method, MethodError, Plan, register_method

__all__ = ["Block1xNOptions", "Block1xN", "ramp_schedule", "bpar_scores", "regrow_count", "block_row_mask"]


def ramp_schedule(kind: str, start_step: int, end_step: int, unit: int = 1, exp_rate: float | None = None) -> Schedule:
    """rho(t) in [0, 1] of SUBP's prune-rate ramps, as a schedule of the optimizer step.

    Args:
        kind: ``linear``, ``cos``, ``cubic`` or ``exp``.
        start_step / end_step: rho is 0 before ``start_step`` and 1 from ``end_step`` on (both 0: 1 from
            the start).
        unit: steps between mask updates (SUBP updates once per epoch; its ``saturating_exp`` ramp reaches 1 one
            update before the end).
        exp_rate: rate of the ``saturating_exp`` ramp per step (default SUBP's 0.05 per update: 0.05 / unit).
    """
    if start_step == end_step == 0:
        return Constant(1.0)
    if kind == "linear":
        return Power(0.0, 1.0, start_step, end_step, 1.0)
    if kind == "cubic":
        return Power(0.0, 1.0, start_step, end_step, 3.0)
    if kind == "cos":
        return SineIn(0.0, 1.0, start_step, end_step)
    if kind == "saturating_exp":
        return SaturatingExp(0.0, 1.0, start_step, end_step, exp_rate if exp_rate is not None else 0.05 / unit, unit)
    raise MethodError(f"unknown ramp {kind!r}; expected linear, cos, saturating_exp or cubic")


def regrow_count(prune_rate: float, rho: float, channels: int) -> int:
    """Blocks regrown per row: ``int((p - p_e) * C_in)`` with p = ``prune_rate``, p_e = p rho, as SUBP's
    code computes it (from the rates, not from the whole number of pruned blocks: at p C_in = 4.9 and
    rho = 0.1 that regrows 4, where 90% of the 4 pruned would give 3)."""
    return int((prune_rate - prune_rate * rho) * channels)


def _block_vectors(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``[rows, in, block * kh * kw]``: each 1xN block as a vector."""
    out, inp = weight.shape[:2]
    blocks = weight.reshape(out // block, block, inp, -1)
    return blocks.permute(0, 2, 1, 3).reshape(out // block, inp, -1)


def bpar_scores(weight: torch.Tensor, row_mask: torch.Tensor, block: int, alpha: float = 1.0,
                masked_l1: bool = True) -> torch.Tensor:
    """BPAR block scores ``[rows, in]`` (see module docstring): ``row_mask`` (``[rows, in]``, the current
    block mask) always applies to the redundancy term; ``masked_l1`` (SUBP V2) also to the L1 share."""
    vectors = _block_vectors(weight.detach().float(), block)
    l1 = (vectors * row_mask[..., None].float() if masked_l1 else vectors).abs().sum(-1)
    a = l1 / l1.sum(-1, keepdim=True).clamp_min(1e-12)
    unit = torch.nn.functional.normalize(vectors * row_mask[..., None].float(), dim=-1)
    redundancy = (unit @ unit.transpose(1, 2)).abs().sum(-1)  # [rows, in]
    b = redundancy / redundancy.sum(-1, keepdim=True).clamp_min(1e-12)
    b = torch.where(b == 0, torch.ones_like(b), b)
    return a - alpha * b


def block_row_mask(scores: torch.Tensor, pruned: int, regrow: int, temperature: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """``[rows, in]`` bool: drop the ``pruned`` lowest blocks per row, then regrow ``regrow`` by sampling."""
    rows, inp = scores.shape
    order = torch.argsort(scores, dim=1, stable=True)  # ascending
    mask = torch.ones(rows, inp, dtype=torch.bool)
    if pruned == 0:
        return mask
    low = order[:, :pruned]
    mask.scatter_(1, low, False)
    if regrow > 0:
        low_scores = torch.gather(scores.float(), 1, low)
        u = torch.nn.functional.normalize(low_scores, dim=1)
        probs = torch.softmax(u / temperature, dim=1)
        picks = torch.multinomial(probs, regrow, replacement=False, generator=generator)
        mask.scatter_(1, torch.gather(low, 1, picks), True)
    return mask


@dataclass
class Block1xNOptions:
    criterion: Literal["l1", "l2", "bpar"] = field(default="l1", metadata={"help": "block importance"})
    score_masked: bool = field(default=True, metadata={"help": "score masked weights (SUBP V2) or raw ones (V1)"})
    mode: Literal["soft", "hard"] = field(default="soft", metadata={"help": "soft: STE + decay (SUBP); hard: masked "
                                                                     "gradient (HUBP)"})
    decay: float = field(default=SRSTE_DEFAULT_DECAY, metadata={"help": "lambda of the decay on pruned weights"})
    hard_decay: bool = field(default=True, metadata={"help": "hard mode: pruned weights still get the decay, as in "
                                                     "SUBP's HUBP (false: no gradient at all)"})
    ramp: Literal["linear", "saturating_exp", "cos", "cubic"] = field(
        default="cubic", metadata={"help": "prune-rate ramp (saturating_exp: SUBP's 'exp' curve)"})
    ramp_start_step: int = field(default=0, metadata={"help": "step the ramp starts (dense before, with regrowth)"})
    ramp_end_step: int = field(default=0, metadata={"help": "step the full rate is reached (before the run's end; "
                                                    "both 0: the full rate from the start)"})
    update_every_steps: int = field(default=1000, metadata={"help": "steps between mask updates (SUBP: one epoch)"})
    ramp_exp_rate: float | None = field(default=None, metadata={"help": "rate per step of the saturating_exp ramp "
                                                                "(default 0.05 per update, SUBP's)"})
    regrow_temperature: float = field(default=1.0, metadata={"help": "tau of the regrowth softmax"})
    bpar_alpha: float = field(default=1.0, metadata={"help": "weight of the redundancy term of bpar"})
    seed: int = field(default=0, metadata={"help": "seed of the regrowth sampling"})

    def __post_init__(self) -> None:
        if self.decay < 0 or self.regrow_temperature <= 0:
            raise ValueError("decay must be >= 0 and regrow_temperature > 0")
        if not (self.ramp_start_step == self.ramp_end_step == 0) and not (
                0 <= self.ramp_start_step < self.ramp_end_step):
            raise ValueError(f"need 0 <= ramp_start_step < ramp_end_step (or both 0), got "
                             f"{self.ramp_start_step}, {self.ramp_end_step}")
        if self.update_every_steps < 1:
            raise ValueError(f"update_every_steps must be >= 1, got {self.update_every_steps}")


@register_method("block_1xn")
class Block1xN(Method):
    Options = Block1xNOptions

    def __init__(self, options: Block1xNOptions | None = None) -> None:
        super().__init__(options)
        self.grad_rule = "srste" if self.options.mode == "soft" else "masked"
        self.updates = 0  # mask updates so far (seeds the regrowth sampling)
        self.next_step = 0
        self.order: dict[str, int] = {}
        o = self.options
        self.ramp = ramp_schedule(o.ramp, o.ramp_start_step, o.ramp_end_step, o.update_every_steps, o.ramp_exp_rate)

    @property
    def decay(self) -> float:
        return self.options.decay if self.options.mode == "soft" or self.options.hard_decay else 0.0

    def set_horizon(self, total_steps: int) -> None:
        super().set_horizon(total_steps)
        end = self.options.ramp_end_step
        if end and end >= total_steps:
            raise MethodError(
                f"block_1xn ramp_end_step={end} is not before the run's end ({total_steps} steps); lower it so the "
                "final masks are reached and then fine-tuned")

    def prepare(self, layers: Layers, model: torch.nn.Module) -> None:
        for index, fqn in enumerate(sorted(layers)):
            self.order[fqn] = index

    def masks_due(self, step: int) -> bool:
        return (step + 1) % self.options.update_every_steps == 0

    def advance(self, step: int, layers: Layers) -> Plan:
        self.next_step = step
        self.updates = step // self.options.update_every_steps
        return Plan()

    def mask(self, layer: LayerState) -> torch.Tensor:
        o = self.options
        pattern = layer.patterns[0]
        if not isinstance(pattern, BlockPattern) or len(set(layer.patterns)) != 1:
            raise MethodError(
                f"block_1xn needs a 1xN pattern such as '1x16:0.25'; {layer.fqn} has {layer.pattern_text}"
            )
        weight = layer.dense_weight.detach()
        attached = layer.fqn in self.order  # False while the Sparsifier attaches: no current mask yet
        current = layer.mask if attached else torch.ones_like(weight, dtype=torch.bool)
        row_mask = current.reshape(weight.shape[0] // pattern.block, pattern.block, weight.shape[1], -1)[:, 0, :, 0]
        scored = weight * current if o.score_masked else weight
        if o.criterion == "bpar":
            scores = bpar_scores(weight, row_mask, pattern.block, o.bpar_alpha, masked_l1=o.score_masked)
        else:
            scores = block_scores(scored, pattern.block, o.criterion)
        inp = weight.shape[1]
        pruned = inp - pattern.kept_per_row(inp)
        rho = self.ramp(self.next_step)
        generator = torch.Generator().manual_seed(
            (o.seed * 1_000_003 + self.updates * 7919 + self.order.get(layer.fqn, 0)) % (2**63))
        regrow = min(pruned, regrow_count(1.0 - pattern.density, rho, inp))
        rows = block_row_mask(scores, pruned, regrow, o.regrow_temperature, generator)
        return expand_block_mask(rows, weight.shape, pattern.block)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        self.next_step = int(state.get("next_step", 0))

    def summary(self) -> dict:
        return {"mask_updates": self.updates, "rho": self.ramp(self.next_step)}
