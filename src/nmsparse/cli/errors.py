"""Exception types the CLI reports as one line with exit status 2 (user errors, not bugs)."""

from __future__ import annotations

from .._registry import RegistryError
from ..allocate import AllocationError
from ..export import ExportError
from ..method import MethodError
from ..models import ModelError
from ..pattern import PatternError
from ..runtime.formats import FormatError
from ..runtime.quant import QuantError
from ..schema import ConfigError
from ..select import SelectionError
from ..sparsifier import SparsifierError


class CliError(ValueError):
    """A CLI-level problem (bad combination of flags)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    AllocationError, CliError, ConfigError, FormatError, ExportError, MethodError, ModelError, PatternError,
    QuantError, RegistryError, SelectionError, SparsifierError, FileNotFoundError, FileExistsError, NotADirectoryError,
)


def register_user_error(exc_type: type[BaseException]) -> None:
    """Let a subsystem (data, training) declare its own user-facing error type."""
    global USER_ERRORS
    if exc_type not in USER_ERRORS:
        USER_ERRORS = (*USER_ERRORS, exc_type)
