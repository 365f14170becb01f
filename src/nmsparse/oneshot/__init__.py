"""One-shot pruning of trained models: one entry point, :func:`prune`, for the whole pipeline.

* :mod:`.prune` -- the pipeline (permute, calibrate and prune, fidelity, recover, export, reload check);
* :mod:`.calibrate` -- block-by-block calibration statistics and per-layer pruning;
* :mod:`.data` -- calibration and held-out data (text windows, sentences, images);
* :mod:`.fidelity` -- the measure chosen by model kind (perplexity, embedding cosine, output agreement);
* :mod:`.recover` -- distillation from the dense model with masks held;
* :mod:`.result` -- :class:`PruneResult` and its rows, :class:`LayerRow`.
"""

from ..models import run_model
from .calibrate import find_blocks
from .data import CalibrationError
from .fidelity import FidelityCheck, model_kind, perplexity
from .prune import Recovery, prune
from .recover import recover
from .result import LayerRow, PruneResult

__all__ = ["CalibrationError", "FidelityCheck", "LayerRow", "PruneResult", "Recovery", "find_blocks", "model_kind",
           "perplexity", "prune", "recover", "run_model"]
