"""Export: dense-with-zeros safetensors plus a versioned manifest."""

from .dense import compare_export, is_export, load_export, open_model, save_export, verify_weights
from .manifest import ExportError, entry_patterns, read_manifest

__all__ = [
    "ExportError",
    "compare_export",
    "entry_patterns",
    "is_export",
    "load_export",
    "open_model",
    "read_manifest",
    "save_export",
    "verify_weights",
]
