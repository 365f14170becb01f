"""A one-shot run from a model source and one config: what ``nmsparse prune`` runs.

:func:`prune_source` opens the model (``timm:``, ``torchvision:``, ``hf:``, ``gguf:`` or an export),
builds the data each step needs with the defaults of the model's kind, and calls :func:`~.prune.prune`
(or, with ``stream``, :func:`~.stream.prune_streaming`, one decoder block at a time). The defaults:

* calibration (calibrated methods, ``refine``, ``best``, recovery): ``text:builtin`` for text models,
  ``digits`` for vision models, ``samples`` windows of ``seq_len`` tokens;
* recovery data: causal LMs train on fresh windows of the calibration text (another seed, batches of
  8); encoders on whole sentences of it, batched by length; other models on the calibration batches;
* held-out data (the fidelity measure): causal LMs ``text:heldout`` (built-in text calibration never
  sees); encoders sentences of it; vision models another draw of their images.

The report says which data each step read (``describe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..select import Selection
from .result import PruneResult

__all__ = ["PruneConfig", "prune_source"]


@dataclass(frozen=True)
class PruneConfig:
    """Everything of a one-shot run but the model source and the output directory.

    pattern / method / selection / method_options: as :func:`nmsparse.oneshot.prune`.
    calib: calibration data spec (None: the model kind's default, where the run needs data).
    samples / seq_len / seed: calibration samples, tokens per text sample, sampling seed.
    permute_sweeps: search input-channel permutations first, at most this many sweeps (None: off).
    refine: refine each layer's mask against its output error after the method.
    recover_steps / recover_minutes / recover_lr / recover_objective: distillation after pruning
        (steps and/or a time budget; None for both: no recovery).
    heldout / heldout_tokens / window: held-out data spec of the fidelity measure (None: the kind's
        default), tokens of it (causal LMs), perplexity window.
    weights / group_size: prune and quantize in one pass (``int8`` / ``int4``).
    stream: causal LMs larger than memory, one decoder block at a time from the shards.
    checkpoint / num_classes / in_chans: local weights to load first; a vision model's classes and
        input channels.
    """

    pattern: str = "2:4"
    method: str = "magnitude"
    selection: Selection = field(default_factory=Selection)
    method_options: dict[str, Any] | None = None
    calib: str | None = None
    samples: int = 128
    seq_len: int = 128
    seed: int = 0
    permute_sweeps: int | None = None
    refine: bool = False
    recover_steps: int | None = None
    recover_minutes: float | None = None
    recover_lr: float = 2e-4
    recover_objective: str = "auto"
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
        from ..runtime.quant import parse_weights

        parse_weights(self.weights, self.group_size)  # QuantError before minutes of work
        if self.stream and (self.refine or self.method == "best"):
            raise ValueError("refine and method best run in the in-memory pipeline; drop stream")
        if self.stream and self.weights != "fp32":
            raise ValueError("stream writes float32 exports; weights int8/int4 need the in-memory pipeline "
                             "(drop stream)")
        if self.stream and (self.recovering or self.permute_sweeps or self.checkpoint):
            raise ValueError("stream cannot be combined with recovery, permute or checkpoint (each needs the "
                             "whole model in memory)")

    @property
    def recovering(self) -> bool:
        return bool(self.recover_steps or self.recover_minutes)


def prune_source(model: str, config: PruneConfig, out: str | Path, progress: str = "auto") -> PruneResult:
    """Prune the model ``model`` names (``timm:NAME``, ``torchvision:NAME``, ``hf:PATH``, ``gguf:FILE`` or
    an export directory) with ``config``, writing the export to ``out`` (atomically).

    Raises:
        ModelError / CalibrationError / MethodError / QuantError: bad input, before any file is written.
    """
    if config.stream:
        return _streaming(model, config, out, progress)
    from ..export import open_model
    from ..method import CalibratedMethod, build_method
    from ..models import example_input, load_weights
    from .data import build_calibration, heldout_data
    from .fidelity import model_kind
    from .prune import prune

    net, source = open_model(model, num_classes=config.num_classes, in_chans=config.in_chans)
    if config.checkpoint:
        load_weights(net, config.checkpoint)
    net.eval()
    kind = model_kind(net)
    calibrated = (config.method == "best" or isinstance(build_method(config.method), CalibratedMethod)
                  or config.calib or config.recovering or config.refine)
    spec = config.calib or ("text:builtin" if source.is_text else "digits")
    batches = (build_calibration(spec, net, source, config.samples, config.seq_len, config.seed)
               if calibrated else None)
    recovery = _recovery(config, kind, source, spec, batches) if config.recovering else None
    heldout = None
    if source.is_text or calibrated:
        heldout = heldout_data(net, source, kind, config.heldout, config.heldout_tokens, seed=config.seed)
    describe = _describe(model, config, kind, spec, batches, heldout, recovery)
    return prune(net, config.pattern, config.method, config.selection, config.method_options, calibration=batches,
                 permute=config.permute_sweeps, heldout=heldout, recover=recovery, out=out, source=source,
                 example_inputs=example_input(net, source), progress=progress, window=config.window,
                 describe=describe, weights=config.weights, group_size=config.group_size, refine=config.refine)


def _recovery(config: PruneConfig, kind: str, source: Any, spec: str, batches: list[Any] | None):
    """The recovery of ``config`` with its model kind's training data (see the module docstring)."""
    from .data import load_texts, load_tokenizer, sentence_training_batches, token_windows
    from .prune import Recovery

    train = batches
    if kind == "encoder":  # whole sentences of the calibration text, batched by length
        train = sentence_training_batches(load_tokenizer(source.hf_dir), load_texts(spec),
                                          max_length=config.seq_len, seed=config.seed + 1)
    elif kind == "causal_lm":  # fresh windows of the calibration text, small batches (more steps per minute)
        train = token_windows(load_tokenizer(source.hf_dir), load_texts(spec), max(512, config.samples),
                              config.seq_len, seed=config.seed + 1, batch_size=8)
    return Recovery(train, config.recover_steps, config.recover_minutes * 60 if config.recover_minutes else None,
                    config.recover_lr, config.recover_objective)


def _describe(model: str, config: PruneConfig, kind: str, spec: str, batches, heldout, recovery) -> dict:
    """The data of each step, for the report: calibration, the fidelity measure, the recovery."""
    heldout_spec = {"causal_lm": config.heldout or "text:heldout", "encoder": "sentences of text:heldout"}.get(
        kind, config.heldout or "digits (another draw than calibration's)")
    return {"model": model,
            "calibration": {"source": spec, "samples": config.samples, "seq_len": config.seq_len} if batches else None,
            "heldout": heldout_spec if heldout is not None else None,
            "recovery_data": None if recovery is None else {
                "causal_lm": f"{spec} (windows drawn with another seed than calibration's)",
                "encoder": f"sentences of {spec}"}.get(kind, f"the calibration batches ({spec})")}


def _streaming(model: str, config: PruneConfig, out: str | Path, progress: str) -> PruneResult:
    from ..models import ModelError, ModelSource, is_causal_lm_dir, resolve_hf_dir
    from .data import build_calibration
    from .stream import prune_streaming

    try:
        directory = resolve_hf_dir(model)
    except ModelError:
        directory = None
    if directory is None or not is_causal_lm_dir(directory):
        raise ModelError(f"streamed pruning takes causal LMs from a Hugging Face directory or GGUF file, not {model}")
    source = ModelSource(f"hf:{directory}")
    batches = None
    if config.method != "magnitude" or config.calib:
        batches = build_calibration(config.calib or "text:builtin", None, source, config.samples, config.seq_len,
                                    config.seed)
    result = prune_streaming(directory, out, config.pattern, config.method, batches, config.selection,
                             progress=progress)
    result.model = model
    return result
