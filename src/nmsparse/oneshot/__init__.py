"""One-shot pruning of trained models: :func:`prune` is the one entry point, for a model in memory with the
data it is given or for a model source (what ``nmsparse prune`` runs), whose data it builds with its model
kind's defaults; one :class:`PruneConfig` describes the run.

* :mod:`.prune` -- the entry point and the pipeline (permute, calibrate and prune, fidelity, recover, export,
  reload check);
* :mod:`.config` -- :class:`PruneConfig`, range-checked;
* :mod:`.pipeline` -- a model source opened with its kind's data defaults; streaming;
* :mod:`.calibrate` -- block-by-block calibration statistics and per-layer pruning;
* :mod:`.data` -- calibration and held-out data (text windows, sentences, images);
* :mod:`.fidelity` -- the measure chosen by model kind (perplexity, embedding cosine, output agreement);
* :mod:`.tune` -- scale tuning: norms and per-channel scales fitted to the dense model, folded into the weights;
* :mod:`.recover` -- distillation from the dense model with masks held;
* :mod:`.result` -- :class:`PruneResult` and its rows, :class:`LayerRow`.
"""

from ..models import run_model
from .calibrate import find_blocks
from .config import PruneConfig
from .data import CalibrationError
from .fidelity import FidelityCheck, model_kind, perplexity
from .prune import prune
from .recover import Recovery, recover
from .result import LayerRow, PruneResult
from .tune import Tuning, tune_scales

__all__ = ["CalibrationError", "FidelityCheck", "LayerRow", "PruneConfig", "PruneResult", "Recovery", "find_blocks",
           "Tuning", "model_kind", "perplexity", "prune", "recover", "run_model", "tune_scales"]
