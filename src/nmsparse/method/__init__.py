"""Registered sparsity methods. Importing this package registers every built-in method."""

from . import magnitude, srste  # noqa: F401  (registration side effect)
from .base import METHODS, Method, MethodError, NoOptions, build_method, list_methods, register_method

__all__ = ["METHODS", "Method", "MethodError", "NoOptions", "build_method", "list_methods", "register_method"]
