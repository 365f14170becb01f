"""Which layers become sparse, and with which pattern.

A :class:`Selection` names *layer sets* (presets such as ``all``, ``ff``, ``qkv``) and an ordered
list of :class:`Rule` s. For every Conv/Linear module of a model:

1. The first rule whose ``match`` fits the module decides: ``skip`` keeps it dense, otherwise it is
   made sparse with the rule's pattern (or slice patterns), or the default pattern. A rule matches
   by exact fqn (``"blocks.0.mlp.fc1"``), by regex on the fqn (``"re:.*mlp\\.fc\\d"``) or by module
   type (``"type:Conv2d"``).
2. With no matching rule, the module is sparse when it is in one of the selected layer sets,
   unless a guard keeps it dense: the first conv (``keep_first_conv``), the classifier
   (``keep_classifier``) and grouped/depthwise convs (``keep_grouped_conv``).
3. A module whose shape does not fit its pattern is never mangled: it is skipped, with the reason.

Fused attention projections (timm's ``attn.qkv``, ``query_key_value``) are handled as three equal
row slices (q, k, v), each with its own pattern, without rewriting the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .pattern import Pattern, PatternError, parse_pattern

__all__ = ["Rule", "Selection", "LayerChoice", "LAYER_SETS", "select_layers", "SelectionError", "nothing_selected"]


class SelectionError(ValueError):
    """A rule or layer-set name is invalid."""


_FF = (
    r"(mlp\.fc[12]|mlp\.(gate|up|down)_proj|mlp\.c_(fc|proj)|(?<!attention\.)output\.dense"
    r"|intermediate\.dense|ffn\.\w+|feed_forward\.\w+|mlp\.\d+|mlp\.linear_[12])"
)
_QKV = (r"(attn\.qkv|attn\.c_attn|attn\.[qkv]|attention\.self\.(query|key|value)|self_attn\.[qkv]_proj"
        r"|query_key_value|[qkv]_proj)")
_ATTN_OUT = r"(attn\.proj|attn\.c_proj|attention\.output\.dense|self_attn\.(o|out)_proj|attn\.out_proj|o_proj)"

#: Named layer sets. "all" is every Conv and Linear; the transformer sets use name regexes covering
#: timm (ViT, DeiT, Swin), torchvision and Hugging Face (BERT/MiniLM, Llama-style) naming.
LAYER_SETS: dict[str, str] = {
    "all": "every Conv and Linear layer",
    "conv": "every Conv layer",
    "linear": "every Linear layer",
    "ff": "transformer feed-forward (MLP) Linears",
    "qkv": "attention query/key/value projections (fused qkv as 3 row slices)",
    "attn-out": "attention output projections",
    "attention": "qkv + attn-out",
}
_SET_REGEX = {"ff": _FF, "qkv": _QKV, "attn-out": _ATTN_OUT, "attention": f"({_QKV}|{_ATTN_OUT})"}
_FUSED_QKV = re.compile(r"(^|\.)(qkv|query_key_value|c_attn)$")


@dataclass(frozen=True)
class Rule:
    """One selection rule; the first matching rule wins.

    Args:
        match: exact module fqn, ``"re:REGEX"`` (full match on the fqn) or ``"type:ClassName"``.
        pattern: pattern for matched layers (text); None uses the default pattern.
        skip: keep matched layers dense.
        slices: patterns for equal row slices of the weight (e.g. q, k, v of a fused qkv).
    """

    match: str
    pattern: str | None = None
    skip: bool = False
    slices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.match:
            raise SelectionError("a rule needs a non-empty match: an fqn, 're:REGEX' or 'type:ClassName'")
        if self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as exc:
                raise SelectionError(f"rule {self.match!r}: invalid regex ({exc})") from None
        if self.skip and (self.pattern or self.slices):
            raise SelectionError(f"rule {self.match!r}: 'skip' cannot be combined with a pattern")
        for spec in ([self.pattern] if self.pattern else []) + list(self.slices or ()):
            parse_pattern(spec)  # raises PatternError with the valid forms

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse the CLI form ``MATCH=PATTERN``, ``MATCH=skip`` or ``MATCH=P1,P2,P3`` (slices)."""
        match, sep, value = text.rpartition("=")
        if not sep or not match:
            raise SelectionError(
                f"cannot parse rule {text!r}: expected MATCH=PATTERN, MATCH=skip or MATCH=P1,P2,P3 "
                "(e.g. 're:.*head=skip', 'blocks.0.attn.qkv=2:4,2:4,4:8')"
            )
        value = value.strip()
        if value == "skip":
            return cls(match.strip(), skip=True)
        parts = tuple(p.strip() for p in value.split(","))
        if len(parts) > 1:
            return cls(match.strip(), slices=parts)
        return cls(match.strip(), pattern=parts[0])

    def matches(self, fqn: str, module: nn.Module) -> bool:
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], fqn) is not None
        if self.match.startswith("type:"):
            return type(module).__name__ == self.match[5:]
        return fqn == self.match


@dataclass(frozen=True)
class Selection:
    """Layer sets, rules and guards (see module docstring)."""

    layers: tuple[str, ...] = ("all",)
    rules: tuple[Rule, ...] = ()
    keep_first_conv: bool = True
    keep_classifier: bool = True
    keep_grouped_conv: bool = True

    def __post_init__(self) -> None:
        unknown = [name for name in self.layers if name not in LAYER_SETS]
        if unknown:
            raise SelectionError(
                f"unknown layer set(s) {', '.join(map(repr, unknown))}; valid: {', '.join(LAYER_SETS)}"
            )


@dataclass
class LayerChoice:
    """The decision for one Conv/Linear module."""

    fqn: str
    module: nn.Module
    patterns: tuple[Pattern, ...] = ()  # one per equal row slice; empty when skipped
    skip_reason: str | None = None
    rule: str | None = field(default=None)  # the rule that decided, if any

    @property
    def selected(self) -> bool:
        return self.skip_reason is None


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and getattr(module, "weight", None) is not None


def nothing_selected(model: nn.Module, what: str) -> str:
    """The message for a selection that found no layer: names layer kinds nmsparse does not prune
    (transformers' GPT-2-style ``Conv1D``, whose weight is stored [in, out]) when the model has them."""
    conv1d = [fqn for fqn, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")]
    if conv1d:
        return (f"no layer was selected {what}: this model's projections are transformers Conv1D layers "
                f"({conv1d[0]} and {len(conv1d) - 1} more; GPT-2 style, weight stored [in, out]); call "
                "nmsparse.models.conv1d_as_linear(model) first to make them the nn.Linear layers they compute "
                "(build_model and the CLI do this for hf: models)")
    return f"no layer was selected {what}; check the layer sets and rules"


def _in_sets(fqn: str, module: nn.Module, sets: tuple[str, ...]) -> bool:
    for name in sets:
        if name == "all":
            return True
        if name == "conv" and isinstance(module, nn.modules.conv._ConvNd):
            return True
        if name == "linear" and isinstance(module, nn.Linear):
            return True
        regex = _SET_REGEX.get(name)
        if regex and isinstance(module, nn.Linear) and re.search(rf"(^|\.){regex}$", fqn):
            return True
    return False


def _classifier(model: nn.Module) -> nn.Module | None:
    """The output layer: timm's ``get_classifier()``, a Hugging Face LM head (``get_output_embeddings()``),
    else the last Linear."""
    output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(output_embeddings):
        head = output_embeddings()
        if isinstance(head, nn.Linear):
            return head
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - a model's own helper may not apply to every variant
            head = None
        if isinstance(head, nn.Module) and _is_candidate(head):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _resolve_patterns(fqn: str, module: nn.Module, specs: tuple[str | Pattern, ...]) -> tuple[Pattern, ...]:
    if len(specs) == 1 and _FUSED_QKV.search(fqn) and module.weight.shape[0] % 3 == 0:
        specs = specs * 3  # fused q, k, v: three slices so groups never straddle two projections
    patterns = tuple(parse_pattern(s) for s in specs)
    rows = module.weight.shape[0]
    if rows % len(patterns):
        raise PatternError(f"{rows} output rows cannot be split into {len(patterns)} equal slices")
    slice_shape = (rows // len(patterns),) + tuple(module.weight.shape[1:])
    for p in patterns:
        if not p.is_dense:
            p.check_shape(slice_shape)
    return patterns


def select_layers(model: nn.Module, selection: Selection, default_pattern: str | Pattern) -> list[LayerChoice]:
    """Decide, for every Conv/Linear module of ``model``, whether and how it becomes sparse.

    Returns:
        One :class:`LayerChoice` per candidate module, in module order (skipped ones included,
        with their reason).

    Raises:
        SelectionError: a rule that matches no candidate layer (an unknown module type, a misspelt
            fqn or regex): it would otherwise be silently ignored.
    """
    default = parse_pattern(default_pattern)
    candidates = [(fqn, m) for fqn, m in model.named_modules() if _is_candidate(m)]
    first_conv = next((m for _, m in candidates if isinstance(m, nn.modules.conv._ConvNd)), None)
    head = _classifier(model)
    choices = []
    for fqn, module in candidates:
        choice = LayerChoice(fqn, module)
        rule = next((r for r in selection.rules if r.matches(fqn, module)), None)
        specs: tuple[str | Pattern, ...] = (default,)
        if rule is not None:
            choice.rule = rule.match
            if rule.skip:
                choice.skip_reason = f"skipped by rule {rule.match!r}"
            elif rule.slices:
                specs = rule.slices
            elif rule.pattern:
                specs = (rule.pattern,)
        elif not _in_sets(fqn, module, selection.layers):
            choice.skip_reason = f"not in layer sets {', '.join(selection.layers)}"
        elif selection.keep_first_conv and module is first_conv:
            choice.skip_reason = "first conv kept dense (keep_first_conv)"
        elif selection.keep_classifier and module is head:
            choice.skip_reason = "classifier kept dense (keep_classifier)"
        elif selection.keep_grouped_conv and getattr(module, "groups", 1) > 1:
            choice.skip_reason = f"grouped/depthwise conv (groups={module.groups}) kept dense (keep_grouped_conv)"
        if choice.skip_reason is None:
            try:
                choice.patterns = _resolve_patterns(fqn, module, specs)
            except PatternError as exc:
                choice.skip_reason = f"shape does not fit: {exc}"
        choices.append(choice)
    used = {c.rule for c in choices}
    unused = [r for r in selection.rules if r.match not in used]
    if unused:
        types = sorted({type(m).__name__ for _, m in candidates})
        described = []
        for rule in unused:
            if rule.match.startswith("type:") and rule.match[5:] not in types:
                described.append(f"{rule.match!r} names no module type of this model (its layers: {', '.join(types)})")
            else:
                described.append(f"{rule.match!r} matches no Linear/Conv layer of this model")
        raise SelectionError("rule " + "; rule ".join(described))
    return choices
