"""The export manifest: a versioned record of each sparse layer's pattern, shape and dtype."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..pattern import Pattern, PatternError, parse_pattern
from ..version import __version__

__all__ = ["ExportError", "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "WEIGHTS_NAME", "make_manifest",
           "read_manifest", "entry_patterns", "layer_entry"]

FORMAT = "nmsparse-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
_REQUIRED_LAYER_KEYS = ("fqn", "param", "shape", "dtype", "pattern", "slices", "axis")


class ExportError(ValueError):
    """An export is missing, corrupt, or its weights break the patterns its manifest records."""


def make_manifest(
    layers: list[dict[str, Any]], model: dict[str, Any], skipped: list[dict[str, str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "layout": "dense",
        "layers": layers,
        "skipped": skipped or [],
        **(extra or {}),
    }


def entry_patterns(entry: dict[str, Any]) -> tuple[Pattern, ...]:
    """Patterns of a manifest layer entry, one per row slice."""
    texts = str(entry["pattern"]).split(",")
    slices = int(entry.get("slices", 1))
    if len(texts) == 1:
        texts = texts * slices
    if len(texts) != slices:
        raise ExportError(f"layer {entry.get('fqn')!r}: {len(texts)} patterns for {slices} slices")
    try:
        return tuple(parse_pattern(t) for t in texts)
    except PatternError as exc:
        raise ExportError(f"layer {entry.get('fqn')!r}: {exc}") from None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an export directory.

    Raises:
        ExportError: missing directory or manifest, invalid JSON, unknown format or version,
            or malformed layer entries.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ExportError(f"export directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise ExportError(f"{directory} has no {MANIFEST_NAME}; it is not an nmsparse export")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is corrupt (invalid JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not an nmsparse manifest (format must be {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path} has format_version {manifest.get('format_version')!r}; this nmsparse reads {FORMAT_VERSION}"
        )
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ExportError(f"{path} is corrupt: 'layers' must be a list")
    for entry in layers:
        missing = [k for k in _REQUIRED_LAYER_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ExportError(f"{path} is corrupt: a layer entry lacks {', '.join(missing)}")
        entry_patterns(entry)
    if not isinstance(manifest.get("model"), dict) or "source" not in manifest["model"]:
        raise ExportError(f"{path} is corrupt: 'model.source' is missing")
    return manifest



def layer_entry(fqn: str, weight: torch.Tensor, patterns: tuple[Pattern, ...],
                input_permutation: list[int] | None = None) -> dict[str, Any]:
    """A manifest entry for one sparse layer (with its input index map, when it has one)."""
    first = patterns[0]
    extra = {"input_permutation": input_permutation} if input_permutation is not None else {}
    return {
        "fqn": fqn,
        "param": "weight",
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "pattern": ",".join(str(p) for p in patterns) if len({str(p) for p in patterns}) > 1 else str(first),
        "slices": len(patterns),
        "axis": first.axis,
        **extra,
    }
