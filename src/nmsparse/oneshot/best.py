"""``method="best"``: the most accurate one-shot pipeline per model kind, by measurement."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BEST", "BestPipeline", "best_pipeline"]


@dataclass(frozen=True)
class BestPipeline:
    """What ``method="best"`` runs: a method, mask refinement or not, the channel permutation's
    sweeps (None: no permutation), sequential calibration inside blocks or not, asymmetric
    calibration or not, the calibration data a source gets when none is named (None: the kind's
    default), its count of samples when none is given (None: 128) and the minutes of scale tuning after the
    masks when the run gives none (None: no tuning; :mod:`.tune`)."""

    method: str
    refine: bool = False
    permute: int | None = None
    sequential: bool = False
    asymmetric: bool = False
    calib: str | None = None
    samples: int | None = None
    tune_minutes: float | None = None

    def __str__(self) -> str:
        return self.method + (" + refine" if self.refine else "") + (
            f" + permute ({self.permute} sweep{'s' if self.permute != 1 else ''})" if self.permute else "") + (
            " + sequential" if self.sequential else "") + (" + asymmetric" if self.asymmetric else "")

    def label(self, tuned: bool) -> str:
        """What ran, for the report: the masks' pipeline (``str``), then scale tuning where the run tuned (a
        run's own ``tune_minutes=0`` turns it off, its own budget replaces this one's)."""
        return str(self) + (" + scale tuning" if tuned else "")


# ``--method best``: the most accurate one-shot pipeline per model kind, by measurement (causal LMs:
# SmolLM2-135M 2:4, perplexity on text of another source than the calibration text; the figures of every
# candidate are in docs/benchmarks.md, "One-shot accuracy on text of another source"; calibration on
# text:broad, 2.78x dense perplexity against 3.10x on text:varied and 3.37x on the built-in text; 256 windows
# of it 3% below 128 with each of two seeds: 2.72x / 2.80x and 2.82x / 2.91x; scale tuning after the masks: seed 0
# 2.73x -> 1.99x in 4 minutes, 1.97x in 6; seed 1 2.90x -> 2.05x in 6); session 16: calibration and tuning
# on text:mixed (text:broad plus gensim's Wikipedia and news text), 2.67x -> 1.93x (seed 0) and 2.66x -> 1.90x
# (seed 1). Encoders (MiniLM 2:4 sparsegpt, mean embedding cosine on text:other's sentences): calibration on
# text:mixed 0.810 against 0.798 on text:broad and 0.769 on the built-in text, then 3 minutes of scale tuning on
# its sentences 0.854. Classifiers have no measurement yet and get sparsegpt alone.
BEST: dict[str, BestPipeline] = {"causal_lm": BestPipeline("sparsegpt", False, 1, True, calib="text:mixed",
                                                           samples=256, tune_minutes=6.0),
                                 "encoder": BestPipeline("sparsegpt", calib="text:mixed", tune_minutes=3.0),
                                 "classifier": BestPipeline("sparsegpt")}


def best_pipeline(kind: str) -> BestPipeline:
    """What ``method="best"`` runs for a model of this kind (:func:`~nmsparse.oneshot.fidelity.model_kind`)."""
    return BEST[kind]
