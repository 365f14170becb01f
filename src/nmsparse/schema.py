"""Typed, strict building of dataclasses from plain data (YAML, CLI overrides, method options).

Every error names its dotted path and, for an unknown key, the nearest valid key; all errors of
one input are collected and raised together as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union

import yaml

from ._registry import nearest

__all__ = ["ConfigError", "build", "to_dict", "yaml_load", "parse_value"]

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more configuration errors, each ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


# YAML 1.1 reads "2:4" as the base-60 integer 124 and "on" as True. Patterns are written "2:4", so
# the loader keeps only plain decimal/hex ints, plain floats, and true/false booleans.
class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":int", ":float", ":bool"))]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


MAX_DEPTH = 32  # recipes nest a few levels; anything deeper is a mistake (or an attack on the parser)


def _depth(value: Any, limit: int) -> int:
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def yaml_load(text: str) -> Any:
    """Parse YAML text with the strict loader above.

    Raises:
        ConfigError: the document nests deeper than :data:`MAX_DEPTH` levels.
    """
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        value = None
        depth = MAX_DEPTH + 1
    else:
        depth = _depth(value, MAX_DEPTH + 1)
    if depth > MAX_DEPTH:
        raise ConfigError([f"the YAML nests more than {MAX_DEPTH} levels deep; a recipe nests a few "
                           "(e.g. optim: {lr: 0.1})"])
    return value


def parse_value(text: str) -> Any:
    """Parse the value of a ``key=value`` override as YAML (``0.1`` -> float, ``[a, b]`` -> list)."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(arg, value, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = nearest(str(value), [str(c) for c in choices])
            errors.append(f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is tuple:
            value = [value]  # a single value for a list field
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {value!r}")
            return None
        item_tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_convert(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return None
        val_tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {str(k): _convert(val_tp, v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected text, got {value!r} (quote it in YAML)")
        return value
    return value


def _build(cls: type[T], data: Any, path: str, errors: list[str]) -> T | None:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or '<root>'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            errors.append(f"{sub}: unknown key{nearest(str(key), list(fields))}; valid keys: {', '.join(fields)}")
            continue
        kwargs[key] = _convert(hints[key], value, sub, errors)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{path or '<root>'}: {exc}")
        return None


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, raising one :class:`ConfigError` with every error."""
    errors: list[str] = []
    out = _build(cls, data, path, errors)
    if errors:
        raise ConfigError(errors)
    return out  # type: ignore[return-value]


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain data (tuples become lists) for YAML/JSON dumps."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
