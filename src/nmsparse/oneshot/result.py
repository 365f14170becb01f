"""The one result type of one-shot pruning, and its one report-row type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerRow", "PruneResult"]


@dataclass
class LayerRow:
    """One layer of the report: a sparse layer (pattern set, verified) or a skipped one (reason set).

    ``density`` is the fraction of non-zero weights after pruning; ``reconstruction_error`` is
    ``||(W - W') X||^2 / ||W X||^2`` on the calibration inputs where it was measured (after
    refinement, where refinement ran).
    """

    fqn: str
    shape: tuple[int, ...]
    pattern: str | None
    density: float
    verified: bool | None
    reconstruction_error: float | None = None
    skip_reason: str | None = None
    refinement: dict[str, Any] | None = None  # what mask refinement did (swaps, errors, seconds), if asked

    def as_dict(self) -> dict[str, Any]:
        out = {"fqn": self.fqn, "shape": list(self.shape), "pattern": self.pattern, "density": round(self.density, 6),
               "verified": self.verified, "reconstruction_error": self.reconstruction_error,
               "skip_reason": self.skip_reason}
        if self.refinement is not None:
            out["refinement"] = self.refinement
        return out


@dataclass
class PruneResult:
    """What :func:`nmsparse.oneshot.prune` did.

    Attributes:
        layers: manifest entries of the sparse layers (what an export records).
        rows: one :class:`LayerRow` per selected or skipped layer.
        skipped: ``{"fqn", "reason"}`` of the layers kept dense.
        method / pattern: as asked.
        calibration: facts about the calibration data (None when there was none).
        permutation: per-layer channel-permutation rows (None when not asked).
        fidelity: ``{"measure", "dense", "before_tuning", "one_shot", "recovered"}`` (the model kind's measure;
            ``one_shot`` is the one-shot pipeline's result, after scale tuning where it ran), or None.
        tuning: the scale tuning's steps, seconds, losses and numbers trained, or None.
        recovery: the recovery's steps, seconds and losses, or None.
        export: the export directory written, and ``reload_max_abs_diff`` of its reload check.
        model: the model's name as the caller gave it (None: not given).
        seconds: wall-clock seconds of each stage (prune, fidelity, recovery).
        weights: the quantization scheme and each Linear layer's storage, when quantized (None: float32).
    """

    layers: list[dict[str, Any]]
    rows: list[LayerRow]
    skipped: list[dict[str, str]] = field(default_factory=list)
    method: str = "magnitude"
    pattern: str = "2:4"
    calibration: dict[str, Any] | None = None
    permutation: list[dict[str, Any]] | None = None
    fidelity: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None
    export: str | None = None
    reload_max_abs_diff: float | None = None
    model: str | None = None
    seconds: dict[str, float] | None = None
    weights: dict[str, Any] | None = None

    @property
    def sparse_rows(self) -> list[LayerRow]:
        return [r for r in self.rows if r.skip_reason is None]

    def as_dict(self) -> dict[str, Any]:
        """The JSON report (``report.json`` of an export)."""
        out: dict[str, Any] = {"method": self.method, "pattern": self.pattern}
        if self.model is not None:
            out["model"] = self.model
        for key in ("calibration", "permutation", "weights", "fidelity", "tuning", "recovery", "seconds", "export",
                    "reload_max_abs_diff"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["layers"] = [r.as_dict() for r in self.rows]
        return out
