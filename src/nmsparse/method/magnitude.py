"""``magnitude``: one-shot pruning by |W| (NVIDIA ASP's criterion).

Masks are decided once at ``prepare`` and held fixed; pruned weights get no gradient, so further
fine-tuning keeps the pattern.
"""

from __future__ import annotations

from .base import Method, register_method


@register_method("magnitude")
class Magnitude(Method):
    grad_rule = "masked"
    one_shot = True
