"""One-shot pruning of a trained model, the whole pipeline behind one call: permute -> calibrate and
prune -> fidelity -> recover -> fidelity -> export -> reload check. No training loop."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..export import compare_export, load_export, save_export
from ..method import CalibratedMethod, Method, MethodError, build_method
from ..models import forward_output
from ..pattern import Pattern, parse_pattern
from ..select import Selection, nothing_selected
from ..sparsifier import Sparsifier
from .best import BEST, BestPipeline, best_pipeline
from .calibrate import prune_with_calibration
from .config import ConfigError, PruneConfig
from .fidelity import FidelityCheck, model_kind
from .recover import Recovery
from .result import LayerRow, PruneResult
from .tune import Tuning

__all__ = ["Recovery", "Tuning", "prune", "best_pipeline", "BEST", "BestPipeline"]

class _Stages:
    """Wall-clock seconds of each stage of a prune (the report's ``seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._t, 2)
        self._t = now


def prune(
    model: nn.Module | str, config: PruneConfig | None = None, *, out: str | Path | None = None,
    calibration: list[Any] | None = None, heldout: Any = None, recover: Recovery | None = None, source: Any = None,
    example_inputs: Any = None, describe: dict[str, Any] | None = None, progress: str = "auto",
    micro_batch: int | None = 4, tune: Tuning | None = None,
) -> PruneResult:
    """Prune a model once and bake the masks into its weights: the one entry point of one-shot pruning
    (``nmsparse prune`` parses its flags into a :class:`PruneConfig` and calls this).

    Args:
        model: a model source (``timm:NAME``, ``torchvision:NAME``, ``hf:PATH``, ``gguf:FILE`` or an export
            directory), opened with the data of its kind built from ``config`` (:mod:`.pipeline`); ``out``
            is then required and the data arguments below must be left out. Or any ``nn.Module``, pruned in
            place with the data given (its selected layers Linear or Conv2d for calibrated methods).
        config: the run (:class:`PruneConfig`; default: magnitude 2:4). With a model in memory the fields
            that name data (calib, samples, seq_len, seed, heldout, heldout_tokens, stream, checkpoint,
            num_classes, in_chans) are not read: pass the data itself.
        out: write an export here (atomically) and check that it reloads to the same outputs; with a model
            in memory it needs ``source`` (a :class:`nmsparse.models.ModelSource`) and ``example_inputs``.
        calibration: calibration batches (tensors, or dicts of keyword tensors), run block by block
            through transformers; with ``magnitude`` they only feed the reconstruction-error report. A
            config that recovers without ``recover`` trains on them.
        heldout: held-out data for the fidelity measure of the model's kind
            (:class:`~nmsparse.oneshot.fidelity.FidelityCheck`): token ids for causal LMs, sentence
            batches for encoders, input batches for classifiers; measured on the dense model, after
            pruning and after recovery.
        recover: a :class:`Recovery` run after pruning (the dense model is the teacher).
        tune: a :class:`~nmsparse.oneshot.tune.Tuning` run after pruning, before recovery: the norms, the
            pruned layers' biases and per-channel scales fitted to the dense model, weights and masks held,
            scales folded into the weights (:mod:`nmsparse.oneshot.tune`). A config that tunes (its own
            ``tune_*`` or ``best``'s budget) without ``tune`` tunes on ``calibration``.
        describe: facts for the report a caller knows and ``prune`` does not: ``{"model": name,
            "calibration": {"source": ..., "samples": ..., ...}, "heldout": what the fidelity measure
            read, "recovery_data": what the recovery and the scale tuning trained on}``.
        progress: ``auto``, ``bar``, ``lines`` or ``none``.
        micro_batch: samples per block forward of calibrated pruning.

    ``config.weights`` int8 / int4 prunes and quantizes in one pass: SparseGPT rounds inside its updates
    (each column's rounding error compensated); every method's result is then snapped to the runtime's
    grid (:func:`nmsparse.oneshot.quantize.snap_to_grid`, round-to-nearest), after recovery too; the
    manifest records the scheme and the report each layer's storage. The export stays dense-with-zeros.
    ``config.refine`` refines every layer's mask after the method by swaps inside its groups that lower
    the layer's output error on the calibration data (:mod:`nmsparse.refine`).

    Returns:
        :class:`PruneResult`; a model in memory is left dense with zeros and without parametrizations.

    Raises:
        ConfigError: data arguments with a model source, or a source without ``out``.
        MethodError: a training method, a calibrated method without calibration data, or no layer selected.
        ModelError / CalibrationError: a source that does not open, data that cannot be built.
    """
    config = config if config is not None else PruneConfig()
    if not isinstance(config, PruneConfig):
        raise ConfigError([f"config must be a PruneConfig, not {type(config).__name__} (e.g. "
                           "PruneConfig(pattern='2:4', method='sparsegpt'))"])
    if isinstance(model, (str, Path)):
        given = [k for k, v in {"calibration": calibration, "heldout": heldout, "recover": recover, "source": source,
                                "example_inputs": example_inputs, "describe": describe, "tune": tune}.items()
                 if v is not None]
        if given:
            raise ConfigError([f"a model source builds its own data; leave out {', '.join(given)} (or pass the "
                               "model itself)"])
        if out is None:
            raise ConfigError(["pruning a model source writes an export: give out=DIR"])
        from .pipeline import open_source, stream_source

        if config.stream:
            return stream_source(str(model), config, out, progress)
        prepared = open_source(str(model), config)
        return _prune_model(prepared.model, config, out=out, progress=progress, micro_batch=micro_batch,
                            **prepared.data)
    if config.calib is not None and calibration is None:
        raise ConfigError([f"calib={config.calib!r} names data for a model source; with a model in memory pass "
                           "calibration= batches"])
    recover, tune = _training(config, model, calibration, recover, tune)
    return _prune_model(model, config, out=out, calibration=calibration, heldout=heldout, recover=recover,
                        source=source, example_inputs=example_inputs, describe=describe, progress=progress,
                        micro_batch=micro_batch, tune=tune)


def _training(config: PruneConfig, model: nn.Module, calibration: list[Any] | None, recover: Recovery | None,
              tune: Tuning | None) -> tuple[Recovery | None, Tuning | None]:
    """The recovery and scale tuning the config asks for (its own budgets, or ``best``'s tuning) where the caller
    passed none, training on the calibration batches."""
    if recover is None and config.recovering:
        recover = Recovery.of(config, calibration)
    if tune is None:
        steps, minutes = config.tune_budget(best_pipeline(model_kind(model)).tune_minutes)
        tune = Tuning.of_budget(config, calibration, steps, minutes) if steps or minutes else None
    return recover, tune


def _prune_model(model: nn.Module, config: PruneConfig, *, out: str | Path | None, calibration: list[Any] | None,
                 heldout: Any, recover: Recovery | None, source: Any, example_inputs: Any,
                 describe: dict[str, Any] | None, progress: str, micro_batch: int | None,
                 tune: Tuning | None = None) -> PruneResult:
    """The in-memory pipeline: permute -> calibrate and prune -> tune -> fidelity -> recover -> export."""
    best, method, built, scheme, refine, permute, sequential, asymmetric = _resolve(model, config, calibration)
    if out is not None and (source is None or example_inputs is None):
        raise ValueError("writing an export needs source= (how to rebuild the model) and example_inputs=")
    pattern = config.pattern
    text = str(parse_pattern(pattern)) if isinstance(pattern, str) else str(pattern)
    result = PruneResult([], [], method=method, pattern=text)
    if best is not None:
        result.method = f"best: {best.label(tune is not None)}"
    clock = _Stages()
    reference = _reference(model, recover is not None or tune is not None, out is not None and bool(permute))
    model.eval()
    check = FidelityCheck(model, heldout, config.window) if heldout is not None else None
    clock.lap("fidelity (dense)")
    _masks(model, result, built, pattern, config.selection, calibration, permute, progress, micro_batch, refine,
           sequential, asymmetric)
    if scheme is not None:
        result.weights = _snap(model, result, scheme, method)
    clock.lap("prune")
    before = _tune(model, reference, result, tune, scheme, check, clock, progress) if tune is not None else {}
    if check is not None:
        result.fidelity = {"measure": check.measure, "dense": check.dense(), **before, "one_shot": check(model)}
        clock.lap("fidelity (one-shot)")
    if recover is not None:
        assert reference is not None
        _recover(model, reference, result, recover, scheme, check, clock, progress)
    result.seconds = clock.seconds
    _describe(result, describe or {})
    if out is not None:
        _write(model, result, out, source, method, reference, example_inputs)
    return result


def _resolve(model: nn.Module, config: PruneConfig, calibration: list[Any] | None):
    """``(best pipeline or None, method, built method, weight scheme or None, refine, permute, sequential,
    asymmetric)``
    from the config, checked before any work: ``best`` resolved for the model's kind (a ``permute`` given
    replaces its sweeps), sparsegpt given the scheme for its joint rounding."""
    from ..runtime.quant import parse_weights

    method, options, refine, permute = config.method, config.method_options, config.refine, config.permute_sweeps
    weights, group_size = config.weights, config.group_size
    sequential, asymmetric = config.sequential, config.asymmetric
    best = None
    if method == "best":
        best = best_pipeline(model_kind(model))
        method, refine, sequential = best.method, best.refine, best.sequential or sequential
        asymmetric = best.asymmetric or asymmetric
        permute = permute if permute is not None else best.permute
        if not calibration:
            raise MethodError(f"--method best runs {method}, which needs calibration data (calibration=[batches])")
    scheme = parse_weights(weights, group_size)
    if scheme is not None and method == "sparsegpt":
        options = {"weights": weights, "group_size": group_size, **(options or {})}
    built = build_method(method, options)
    if not built.one_shot:
        raise MethodError(f"method {method!r} trains masks; use it with `nmsparse train`, not one-shot pruning")
    if isinstance(built, CalibratedMethod) and not calibration:
        raise MethodError(f"method {method!r} needs calibration data (calibration=[batches]); magnitude does not")
    if refine and not calibration:
        raise MethodError("mask refinement needs calibration data (calibration=[batches]): it lowers each layer's "
                          "output error on those inputs")
    if sequential and not calibration:
        raise MethodError("sequential calibration needs calibration data (calibration=[batches]): each group of "
                          "layers is calibrated on inputs through the groups already pruned")
    if asymmetric and not calibration:
        raise MethodError("asymmetric calibration needs calibration data (calibration=[batches]): each layer is "
                          "fitted on those inputs as the dense and the pruned model compute them")
    return best, method, built, scheme, refine, permute, sequential, asymmetric


def _masks(model: nn.Module, result: PruneResult, built, pattern: str | Pattern, selection: Selection | None,
           calibration: list[Any] | None, permute: int | None, progress: str, micro_batch: int | None,
           refine: bool, sequential: bool, asymmetric: bool = False) -> None:
    """Permute (if asked), then prune with calibration or with the method's own masks; fills
    ``result``'s layers, rows, skipped, calibration and permutation."""
    if permute:
        from ..permute import permute_channels

        perms = permute_channels(model, pattern, selection, permute, progress=progress)
        result.permutation = [p.as_dict() for p in perms]
    if calibration:
        result.calibration = {"batches": len(calibration), "sequential": sequential, "asymmetric": asymmetric}
        result.layers, result.rows, result.skipped = prune_with_calibration(
            model, calibration, pattern, built, selection, progress, micro_batch, refine, sequential, asymmetric)
    else:
        assert isinstance(built, Method)
        sparsifier = Sparsifier(built, pattern, selection)
        sparsifier.prepare(model)
        report = sparsifier.report()
        result.layers = sparsifier.squash()
        result.rows = [LayerRow(r.fqn, r.shape, r.pattern, r.density, r.verified, None, r.skip_reason) for r in report]
        result.skipped = [{"fqn": r.fqn, "reason": r.skip_reason} for r in report if r.skip_reason]
    if not result.layers:
        raise MethodError(nothing_selected(model, f"for pattern {result.pattern}"))


def _tune(model: nn.Module, reference: nn.Module | None, result: PruneResult, tune: Tuning, scheme,
          check: FidelityCheck | None, clock: _Stages, progress: str) -> dict[str, Any]:
    """Scale tuning after the masks (and the grid, where quantized: tuning starts from the model as the masks
    left it and its values are rounded again after); ``{"before_tuning": fidelity}`` where measured."""
    from .quantize import snap_to_grid
    from .tune import tune_scales

    assert reference is not None
    before = {}
    if check is not None:
        before = {"before_tuning": check(model)}
        clock.lap("fidelity (before tuning)")
    result.tuning = tune_scales(model, reference, result.layers, tune.batches, tune.steps, tune.seconds, tune.lr,
                                progress=progress, objective=tune.objective, precision=tune.precision)
    result.tuning["lr"] = tune.lr
    if scheme is not None:  # the folded scales moved the values off the grid: round them again
        result.weights["layers"] = snap_to_grid(model, result.layers, scheme)  # type: ignore[index]
    clock.lap("tuning")
    return before


def _recover(model: nn.Module, reference: nn.Module, result: PruneResult, recover: Recovery, scheme,
             check: FidelityCheck | None, clock: _Stages, progress: str) -> None:
    from .recover import recover as distil

    result.recovery = distil(model, reference, result.layers, recover.batches, recover.steps, recover.seconds,
                             recover.lr, progress=progress, objective=recover.objective,
                             precision=recover.precision)
    if scheme is not None:  # recovery moved the values off the grid: round them again
        from .quantize import snap_to_grid

        result.weights["layers"] = snap_to_grid(model, result.layers, scheme)  # type: ignore[index]
    clock.lap("recovery")
    if check is not None:
        result.fidelity["recovered"] = check(model)  # type: ignore[index]
        clock.lap("fidelity (recovered)")


def _describe(result: PruneResult, describe: dict[str, Any]) -> None:
    """What the caller knows and ``prune`` does not, into the report (see ``prune``'s ``describe``)."""
    result.model = describe.get("model", result.model)
    if describe.get("calibration") and result.calibration is not None:
        result.calibration = {**describe["calibration"], **result.calibration}
    if describe.get("heldout") and result.fidelity is not None:
        result.fidelity["heldout"] = describe["heldout"]  # which text the measure read
    for run in (result.tuning, result.recovery):
        if describe.get("recovery_data") and run is not None:
            run["data"] = describe["recovery_data"]


def _reference(model: nn.Module, teacher: bool, reload_permuted: bool) -> nn.Module | None:
    """A copy of the dense original where one is needed: the teacher of a recovery or a tuning, and (with a
    permutation, which the export records and load_export re-attaches) the skeleton of the reload check,
    whose outputs are compared. Otherwise no copy is held (SmolLM2: 538 MB) and the check reads every
    stored tensor back against the model's (compare_export)."""
    return copy.deepcopy(model) if teacher or reload_permuted else None


def _snap(model: nn.Module, result: PruneResult, scheme: Any, method: str) -> dict[str, Any]:
    """The pruned layers' values on the runtime's grid (round to nearest; SparseGPT's joint rounding
    leaves its values on grids that are kept as they are): the report's ``weights``."""
    from .quantize import snap_to_grid

    return {**scheme.as_dict(), "layers": snap_to_grid(model, result.layers, scheme, exact_grid=method == "sparsegpt")}


def _write(model: nn.Module, result: PruneResult, out: str | Path, source: Any, method: str,
           reference: nn.Module | None, example_inputs: Any) -> None:
    """Write the export (atomically, by ``save_export``, with the report's files) and check that it
    reloads to the model: every stored tensor read back, or the outputs of a reloaded copy compared."""
    from .report import report_files

    quant = {"weights": {k: v for k, v in result.weights.items() if k != "layers"}} if result.weights else {}
    directory = save_export(model, out, result.layers, source.as_dict(), result.skipped,
                            extra={"method": method, **quant}, files=report_files(result.as_dict()))
    if reference is None:  # every stored tensor read back against the model's: no second model
        result.export, result.reload_max_abs_diff = str(directory), compare_export(model, directory)
        return
    reloaded, _ = load_export(directory, copy.deepcopy(reference))
    with torch.no_grad():
        diff = forward_output(model, example_inputs).float() - forward_output(reloaded, example_inputs).float()
    result.export, result.reload_max_abs_diff = str(directory), float(diff.abs().max())

