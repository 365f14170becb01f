"""Recipes and overrides -> one validated :class:`Config`.

A recipe is a YAML *override file*: it holds only what differs from the defaults in
:mod:`nmsparse.config.sections` and starts with a comment giving its purpose and the command that
runs it. ``key.sub=value`` overrides from the command line apply on top. Every problem (unknown
key, wrong type, bad value) is collected and raised together as one ConfigError.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..method import METHODS, build_method
from ..pattern import PatternError, parse_pattern
from ..schema import ConfigError, build, parse_value, to_dict, yaml_load
from ..select import Rule, SelectionError
from .epochs import options_in_steps
from .sections import Config

__all__ = ["load_config", "list_recipes", "recipe_path", "recipe_text", "dump_config", "validate_semantics"]


def _recipe_dir():
    return resources.files("nmsparse") / "recipes"


def list_recipes() -> dict[str, str]:
    """Recipe name -> the first line of its header comment (its purpose)."""
    out = {}
    for entry in sorted(_recipe_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            out[entry.name[:-5]] = first.lstrip("# ").strip()
    return out


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe's path by name, or an existing YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError([f"config file {name_or_path!r} does not exist"])
        return path
    entry = _recipe_dir() / f"{name_or_path}.yaml"
    if not entry.is_file():
        from .._registry import nearest

        names = list(list_recipes())
        raise ConfigError(
            [f"unknown recipe {name_or_path!r}{nearest(name_or_path, names)}; shipped: {', '.join(names)}"]
        )
    return Path(str(entry))


def recipe_text(name_or_path: str) -> str:
    return recipe_path(name_or_path).read_text()


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config from a recipe (name or file; None = the default recipe) plus overrides.

    Raises:
        ConfigError: with every error found, each naming its dotted path.
    """
    errors: list[str] = []
    path = recipe_path(source or "default")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML ({str(exc).splitlines()[0]})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a recipe must be a mapping of sections"])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"override {item!r}: expected key.sub=value (e.g. optim.lr=0.05)")
            continue
        _set_dotted(data, key.strip(), parse_value(value))
    try:
        config = build(Config, data)
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors) from None
    errors += validate_semantics(config)
    if errors:
        raise ConfigError(errors)
    return config


def validate_semantics(config: Config) -> list[str]:
    """Checks beyond types: known method and its options, parsable patterns and rules, ranges."""
    errors = []
    sp = config.sparsity
    if sp.method not in METHODS:
        from .._registry import nearest

        errors.append(f"sparsity.method: unknown method {sp.method!r}{nearest(sp.method, METHODS.names())}; "
                      f"available: {', '.join(METHODS.names())}")
    else:
        try:
            build_method(sp.method, options_in_steps(dict(sp.options or {}), 1))
        except (ConfigError, ValueError) as exc:
            errors += [f"sparsity.options: {e}" for e in getattr(exc, "errors", [str(exc)])]
    for key, spec in [("sparsity.pattern", sp.pattern)] + [
        (f"sparsity.allocation.{k}", v) for k, v in (sp.allocation or {}).items()
    ]:
        try:
            parse_pattern(spec)
        except PatternError as exc:
            errors.append(f"{key}: {exc}")
    for i, rule in enumerate(sp.rules):
        try:
            Rule(rule.match, rule.pattern, rule.skip, rule.slices)
        except (SelectionError, PatternError) as exc:
            errors.append(f"sparsity.rules[{i}]: {exc}")
    al = sp.allocate
    if al.kind != "none":
        if not 0.0 < al.sparsity < 1.0:
            errors.append(f"sparsity.allocate.sparsity: must be in (0, 1), got {al.sparsity}")
        if al.m < 1 or any(not 1 <= c <= al.m for c in al.candidates):
            errors.append(f"sparsity.allocate: m must be >= 1 and candidates in [1, m], got m={al.m}, "
                          f"candidates={list(al.candidates)}")
        if sp.allocation or sp.allocation_file:
            errors.append("sparsity.allocate: give either a computed allocation (allocate.kind) or a fixed one "
                          "(allocation / allocation_file), not both")
    checks = [
        (config.train.epochs >= 1, "train.epochs: must be >= 1"),
        (config.data.batch_size >= 1, "data.batch_size: must be >= 1"),
        (0.0 < config.data.val_fraction < 1.0, "data.val_fraction: must be in (0, 1)"),
        (config.optim.lr > 0, "optim.lr: must be > 0"),
        (config.lr.warmup_epochs < config.train.epochs or config.lr.warmup_epochs == 0,
         "lr.warmup_epochs: must be smaller than train.epochs"),
        (config.data.name in ("mnist5k", "digits", "text") or config.data.root,
         f"data.root: required for data.name={config.data.name}"),
        (config.data.name != "text" or config.model.name.startswith(("hf:", "gguf:")),
         f"data.name=text needs a causal LM model (model.name=hf:DIR or gguf:FILE), not {config.model.name!r}"),
        (config.data.name != "text" or config.data.seq_len >= 2, "data.seq_len: must be >= 2"),
        (config.train.ema_decay is None or 0.0 < config.train.ema_decay < 1.0, "train.ema_decay: must be in (0, 1)"),
        (0.0 <= config.train.distill <= 1.0, "train.distill: must be in [0, 1]"),
    ]
    errors += [message for ok, message in checks if not ok]
    return errors


def dump_config(config: Config) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
