"""Method options given in epochs become optimizer steps (methods count steps only)."""

from __future__ import annotations

from typing import Any

__all__ = ["options_in_steps"]


_EPOCH_SUFFIXES = {"_epoch": "_step", "_epochs": "_steps"}


def options_in_steps(options: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """Method options with every ``*_epoch`` / ``*_epochs`` key converted to its ``*_step`` / ``*_steps``
    twin (``ramp_start_epoch: 10`` -> ``ramp_start_step: 10 * steps_per_epoch``): methods count
    optimizer steps only, recipes may count epochs.

    Raises:
        ValueError: if an option is given both ways, or an epoch count is not a non-negative number.
    """
    out = dict(options)
    for key in list(options):
        for suffix, twin in _EPOCH_SUFFIXES.items():
            if not key.endswith(suffix):
                continue
            target = key[: -len(suffix)] + twin
            if target in options:
                raise ValueError(f"sparsity.options gives both {key} and {target}; keep one")
            value = out.pop(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"sparsity.options.{key} must be a non-negative number of epochs, got {value!r}")
            out[target] = int(round(value * steps_per_epoch))
    return out
