"""One-shot pruning of trained models: :func:`prune` runs the whole pipeline on a model in memory with the
data it is given; :func:`prune_source` (what ``nmsparse prune`` runs) opens a model source and builds that
data with its model kind's defaults from one :class:`PruneConfig`.

* :mod:`.prune` -- the pipeline (permute, calibrate and prune, fidelity, recover, export, reload check);
* :mod:`.pipeline` -- :class:`PruneConfig` and :func:`prune_source`: sources, per-kind data defaults, streaming;
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
from .pipeline import PruneConfig, prune_source
from .prune import Recovery, prune
from .recover import recover
from .result import LayerRow, PruneResult

__all__ = ["CalibrationError", "FidelityCheck", "LayerRow", "PruneConfig", "PruneResult", "Recovery", "find_blocks",
           "model_kind", "perplexity", "prune", "prune_source", "recover", "run_model"]
