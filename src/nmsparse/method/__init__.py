"""Registered sparsity methods. Importing this package registers every built-in method."""

from . import block_1xn, learned_nm, magnitude, progressive, ria, sparsegpt, srste, usd, wanda  # noqa: F401  (registration side effect)
from .base import (
    METHODS,
    CalibratedMethod,
    LayerStats,
    Method,
    MethodError,
    NoOptions,
    build_method,
    list_methods,
    register_method,
)

__all__ = [
    "METHODS",
    "CalibratedMethod",
    "LayerStats",
    "Method",
    "MethodError",
    "NoOptions",
    "build_method",
    "list_methods",
    "register_method",
]
