"""nmsparse: N:M and 1xN structured sparsity for PyTorch.

Importing this package imports torch but never initialises CUDA, timm or transformers.
"""

from .export import ExportError, load_export, save_export
from .mask import compute_mask, is_nm, nm_mask
from .method import build_method, list_methods, register_method
from .oneshot import PruneConfig, PruneResult, prune
from .pattern import BlockPattern, NMPattern, PatternError, parse_pattern
from .select import Rule, Selection, SelectionError
from .sparsifier import Sparsifier, SparsifierError
from .version import __version__

__all__ = [
    "BlockPattern",
    "ExportError",
    "NMPattern",
    "PatternError",
    "PruneConfig",
    "PruneResult",
    "Rule",
    "Selection",
    "SelectionError",
    "Sparsifier",
    "SparsifierError",
    "__version__",
    "build_method",
    "compute_mask",
    "is_nm",
    "list_methods",
    "load_export",
    "nm_mask",
    "parse_pattern",
    "prune",
    "register_method",
    "save_export",
]
