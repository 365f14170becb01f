""":class:`PruneConfig`: everything of a one-shot run but the model and the output directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..env import PRECISIONS
from ..pattern import Pattern
from ..schema import ConfigError
from ..select import Selection

__all__ = ["PruneConfig", "ConfigError"]

# field -> (smallest allowed value, what it counts); None values are "not set" and pass
_MINIMUM = {"samples": (1, "calibration samples"), "seq_len": (1, "tokens per sample"), "seed": (0, "a seed"),
            "permute_sweeps": (1, "sweeps"), "recover_steps": (1, "steps"), "recover_minutes": (0.01, "minutes"),
            "recover_lr": (1e-12, "a learning rate"), "tune_steps": (1, "steps"), "tune_minutes": (0, "minutes"),
            "tune_lr": (1e-12, "a learning rate"), "heldout_tokens": (2, "tokens"), "window": (2, "tokens"),
            "num_classes": (1, "classes"), "in_chans": (1, "channels")}


@dataclass(frozen=True)
class PruneConfig:
    """Everything of a one-shot run but the model and the output directory (see :func:`~.prune.prune`).

    pattern: default pattern of the selected layers (``"2:4"``, ``"1x16:0.25"``, ``"2:4@out"``).
    method: ``magnitude`` (no data), ``wanda``, ``ria``, ``sparsegpt`` (calibrated), or ``best``: the
        most accurate pipeline measured for the model's kind (the result's ``method`` names what ran).
    selection / method_options: layer sets, rules and guards; the method's options
        (e.g. ``{"dampening": 0.01}`` for sparsegpt).
    permute_sweeps: search input-channel permutations first, at most this many sweeps (None: off).
    refine: refine each layer's mask against its output error after the method (needs calibration).
    sequential: inside each block, calibrate and prune the layers group by group in the order the block
        calls them, each group on inputs through the groups already pruned (GPTQ's "true sequential"; a
        model without repeated blocks, e.g. a CNN, in the whole model's call order; needs calibration data).
    asymmetric: prune each layer toward the weight that gives, on the inputs the pruned model computes,
        what the dense layer gives on the dense model's inputs, so each layer also undoes the drift the
        layers before it left (an unpruned copy of each block runs beside it; a weight update, needs
        calibration data).
    weights / group_size: prune and quantize in one pass (``int8`` / ``int4``, kept values per scale).
    window: perplexity window (causal LMs).
    recover_steps / recover_minutes / recover_lr / recover_objective / recover_precision: distillation from
        the dense model after pruning (steps and/or a time budget; None for both: no recovery; precision
        ``auto`` / ``fp32`` / ``bf16``, see :func:`nmsparse.oneshot.recover`; the precision of scale tuning too).
    tune_steps / tune_minutes / tune_lr: scale tuning after pruning, before recovery (:mod:`.tune`: the norms,
        the pruned layers' biases and per-channel scales fitted by distillation, weights and masks held, scales
        folded into the weights; None for both: none, or the ``best`` pipeline's own budget; 0 minutes: off).

    Read only when the model is a source (the data of its kind is built from them):
    recover_data: the data spec recovery and scale tuning train on (None: the calibration data's; e.g.
        ``text:wiki`` to calibrate on one text and recover on another).
    calib / samples / seq_len / seed: calibration data spec (None: the kind's default where the run
        needs data), samples (None: 128, or the ``best`` pipeline's own count: 256 for causal LMs), tokens
        per text sample, sampling seed.
    heldout / heldout_tokens: held-out data spec of the fidelity measure (None: the kind's default),
        tokens of it (causal LMs).
    stream: causal LMs larger than memory, one decoder block at a time from the shards.
    checkpoint / num_classes / in_chans: local weights to load first; a vision model's classes and
        input channels.

    Raises:
        ConfigError: a value out of range or a combination the pipeline does not run (one line naming
            the field), before any model is loaded.
    """

    pattern: str | Pattern = "2:4"
    method: str = "magnitude"
    selection: Selection = field(default_factory=Selection)
    method_options: dict[str, Any] | None = None
    calib: str | None = None
    samples: int | None = None
    seq_len: int = 128
    seed: int = 0
    permute_sweeps: int | None = None
    refine: bool = False
    sequential: bool = False
    asymmetric: bool = False
    recover_steps: int | None = None
    recover_minutes: float | None = None
    recover_lr: float = 2e-4
    recover_objective: str = "auto"
    recover_precision: str = "auto"
    recover_data: str | None = None
    tune_steps: int | None = None
    tune_minutes: float | None = None
    tune_lr: float = 3e-3
    heldout: str | None = None
    heldout_tokens: int = 4096
    window: int = 512
    weights: str = "fp32"
    group_size: int = 64
    stream: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None

    def __post_init__(self) -> None:
        from ..runtime.quant import QuantError, parse_weights

        for name, (low, what) in _MINIMUM.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= low):
                raise ConfigError([f"{name} must be at least {low:g} ({what}), got {value!r}"])
        try:  # before minutes of work; the group size is checked with fp32 weights too (never silently unread)
            parse_weights(self.weights, self.group_size)
            parse_weights("int8", self.group_size)
        except QuantError as exc:
            raise ConfigError([str(exc)]) from None
        if self.recover_precision not in PRECISIONS:
            raise ConfigError([f"recover_precision must be one of {', '.join(PRECISIONS)}, "
                               f"got {self.recover_precision!r}"])
        if self.stream and (self.refine or self.method == "best" or self.asymmetric):
            raise ConfigError(["refine, asymmetric and method best run in the in-memory pipeline; drop stream"])
        if self.stream and self.weights != "fp32":
            raise ConfigError(["stream writes float32 exports; weights int8/int4 need the in-memory pipeline "
                               "(drop stream)"])
        if self.stream and (self.recovering or self.tuning or self.permute_sweeps or self.checkpoint):
            raise ConfigError(["stream cannot be combined with recovery, tuning, permute or checkpoint (each needs "
                               "the whole model in memory)"])

        if self.recover_data and not (self.recovering or self.tuning or self.method == "best"):
            raise ConfigError(["recover_data is read by recovery and scale tuning only: add recover_minutes or "
                               "recover_steps (or tune_minutes), or drop it"])

    def samples_for(self, best_samples: int | None = None) -> int:
        """The calibration samples of the run: ``samples`` where given, else the ``best`` pipeline's own
        count (``best_samples``) for method ``best``, else 128."""
        return self.samples or (best_samples if self.method == "best" else None) or 128

    @property
    def recovering(self) -> bool:
        return bool(self.recover_steps or self.recover_minutes)

    @property
    def tuning(self) -> bool:
        """Scale tuning asked for by the config itself (``best`` may add its own: :meth:`tune_budget`)."""
        return bool(self.tune_steps or self.tune_minutes)

    def tune_budget(self, best_minutes: float | None = None) -> tuple[int | None, float | None]:
        """``(steps, minutes)`` of the run's scale tuning, ``(None, None)`` for none: the config's own, else the
        ``best`` pipeline's minutes (``best_minutes``) for method ``best``; ``tune_minutes=0`` turns it off."""
        if self.tune_minutes == 0:
            return self.tune_steps, None
        if self.tuning:
            return self.tune_steps, self.tune_minutes
        return None, (best_minutes if self.method == "best" else None)
