"""The data of a one-shot run on a model source: what :func:`~.prune.prune` builds when it is given a
source name (``timm:``, ``torchvision:``, ``hf:``, ``gguf:`` or an export) instead of a model.

:func:`open_source` opens the model and builds the data each step needs with the defaults of its kind;
:func:`stream_source` runs the streamed pipeline (one decoder block at a time). The defaults:

* calibration (calibrated methods, ``refine``, ``best``, recovery): ``text:builtin`` for text models,
  ``digits`` for vision models, ``samples`` windows of ``seq_len`` tokens;
* recovery and scale-tuning data (``recover_data``, else the calibration spec): causal LMs train on fresh
  windows of its text (another seed, batches of 8); encoders on whole sentences of it, batched by length;
  other models on the calibration batches, or on another draw of ``recover_data``;
* held-out data (the fidelity measure): causal LMs ``text:heldout`` (built-in text calibration never
  sees); encoders sentences of it; vision models another draw of their images.

The report says which data each step read (``describe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import PruneConfig
from .result import PruneResult

__all__ = ["Prepared", "open_source", "stream_source"]


@dataclass
class Prepared:
    """A model opened from its source, with the data of its run (the keyword arguments of the in-memory
    pipeline: calibration, heldout, recover, source, example_inputs, describe)."""

    model: nn.Module
    data: dict[str, Any]


def open_source(model: str, config: PruneConfig) -> Prepared:
    """Open ``model`` (a source name) and build its run's data from ``config`` and its kind's defaults.

    Raises:
        ModelError / CalibrationError: a source that does not open, data that cannot be built.
    """
    from ..export import open_model
    from ..method import CalibratedMethod, build_method
    from ..models import example_input, load_weights
    from .best import best_pipeline
    from .data import build_calibration, heldout_data
    from .fidelity import model_kind
    from .recover import Recovery
    from .tune import Tuning

    net, source = open_model(model, num_classes=config.num_classes, in_chans=config.in_chans)
    if config.checkpoint:
        load_weights(net, config.checkpoint)
    net.eval()
    kind = model_kind(net)
    best = best_pipeline(kind)
    tune_steps, tune_minutes = config.tune_budget(best.tune_minutes)
    tuning = bool(tune_steps or tune_minutes)
    calibrated = (config.method == "best" or isinstance(build_method(config.method), CalibratedMethod)
                  or config.calib or config.recovering or config.refine
                  or config.sequential or config.asymmetric or tuning)
    best_calib = best.calib if config.method == "best" else None  # best's own data
    spec = config.calib or best_calib or ("text:builtin" if source.is_text else "digits")
    samples = config.samples_for(best.samples)
    batches = (build_calibration(spec, net, source, samples, config.seq_len, config.seed)
               if calibrated else None)
    if config.recover_data and not (config.recovering or tuning):  # best of a kind without tuning
        from .config import ConfigError

        raise ConfigError([f"recover_data is read by recovery and scale tuning only, and best for a {kind} tunes "
                           "nothing: add recover_minutes or recover_steps (or tune_minutes), or drop it"])
    train = (_training_batches(config, net, kind, source, spec, batches, samples)
             if config.recovering or tuning else None)
    recovery = Recovery.of(config, train) if config.recovering else None
    tune = Tuning.of_budget(config, train, tune_steps, tune_minutes) if tuning else None
    heldout = None
    if source.is_text or calibrated:
        heldout = heldout_data(net, source, kind, config.heldout, config.heldout_tokens, seed=config.seed)
    return Prepared(net, {"calibration": batches, "heldout": heldout, "recover": recovery, "tune": tune,
                          "source": source, "example_inputs": example_input(net, source),
                          "describe": _describe(model, config, kind, spec, samples, batches, heldout, train)})


def _training_batches(config: PruneConfig, net: nn.Module, kind: str, source: Any, spec: str, batches: list[Any] | None,
                      samples: int) -> list[Any] | None:
    """The recovery's and the scale tuning's training data for the model's kind (see the module docstring)."""
    from .data import load_texts, load_tokenizer, sentence_training_batches, token_windows

    spec = config.recover_data or spec
    if kind == "encoder":  # whole sentences of the calibration text, batched by length
        return sentence_training_batches(load_tokenizer(source.hf_dir), load_texts(spec),
                                         max_length=config.seq_len, seed=config.seed + 1)
    if kind == "causal_lm":  # fresh windows of the calibration text, small batches (more steps per minute)
        return token_windows(load_tokenizer(source.hf_dir), load_texts(spec), max(512, samples),
                             config.seq_len, seed=config.seed + 1, batch_size=8)
    if config.recover_data:  # other models: batches of their own data spec, another draw than calibration's
        from .data import build_calibration

        return build_calibration(spec, net, source, samples, config.seq_len, config.seed + 1)
    return batches


def _describe(model: str, config: PruneConfig, kind: str, spec: str, samples: int, batches, heldout,
              train) -> dict:
    """The data of each step, for the report: calibration, the fidelity measure, the recovery."""
    heldout_spec = {"causal_lm": config.heldout or "text:heldout",
                    "encoder": f"sentences of {config.heldout or 'text:heldout'}"}.get(
        kind, config.heldout or "digits (another draw than calibration's)")
    calibration = {"source": spec, "samples": samples, "seq_len": config.seq_len} if batches else None
    if calibration and spec.startswith("text:"):  # text:broad follows the installed packages' versions
        from .data import load_texts

        calibration["text_chars"] = len(load_texts(spec))
    return {"model": model, "calibration": calibration,
            "heldout": heldout_spec if heldout is not None else None,
            "recovery_data": None if train is None else _training_description(kind, spec, config.recover_data)}


def _training_description(kind: str, spec: str, recover_data: str | None) -> str:
    """What the recovery and the scale tuning read, for the report."""
    if kind == "causal_lm":
        return (f"{recover_data} (windows)" if recover_data
                else f"{spec} (windows drawn with another seed than calibration's)")
    if kind == "encoder":
        return f"sentences of {recover_data or spec}"
    return f"{recover_data} (another draw than calibration's)" if recover_data else f"the calibration batches ({spec})"


def stream_source(model: str, config: PruneConfig, out: str | Path, progress: str) -> PruneResult:
    """The streamed pipeline (``config.stream``): a causal LM's decoder blocks one at a time from its
    safetensors shards (:func:`~.stream.prune_streaming`), the export written block by block."""
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
    if config.method != "magnitude" or config.calib or config.sequential:
        batches = build_calibration(config.calib or "text:builtin", None, source, config.samples_for(),
                                    config.seq_len, config.seed)
    result = prune_streaming(directory, out, config.pattern, config.method, batches, config.selection,
                             progress=progress, sequential=config.sequential)
    result.model = model
    return result
