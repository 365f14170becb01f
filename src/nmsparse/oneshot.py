"""One-shot pruning of a trained model: prepare, decide masks once, squash. No training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .method import MethodError, build_method
from .pattern import Pattern
from .select import Selection
from .sparsifier import LayerReport, Sparsifier

__all__ = ["PruneResult", "prune"]


@dataclass
class PruneResult:
    """What :func:`prune` did: manifest entries of sparse layers, the report, and skipped layers."""

    layers: list[dict[str, Any]]
    report: list[LayerReport]
    skipped: list[dict[str, str]] = field(default_factory=list)


def prune(
    model: nn.Module,
    pattern: str | Pattern = "2:4",
    method: str = "magnitude",
    selection: Selection | None = None,
    method_options: dict[str, Any] | None = None,
) -> PruneResult:
    """Prune ``model`` in place, once, and bake the masks into its weights.

    Args:
        model: any ``nn.Module``.
        pattern: default pattern of selected layers.
        method: a one-shot method name (``magnitude``).
        selection: layer sets, rules and guards.
        method_options: options of the method.

    Returns:
        :class:`PruneResult`; ``model`` is left dense with zeros and without parametrizations.

    Raises:
        MethodError: if ``method`` is not a one-shot method.
    """
    built = build_method(method, method_options)
    if not built.one_shot:
        raise MethodError(f"method {method!r} trains masks; use it with `nmsparse train`, not one-shot pruning")
    sparsifier = Sparsifier(built, pattern, selection)
    sparsifier.prepare(model)
    report = sparsifier.report()
    layers = sparsifier.squash()
    skipped = [{"fqn": r.fqn, "reason": r.skip_reason} for r in report if r.skip_reason]
    return PruneResult(layers, report, skipped)
