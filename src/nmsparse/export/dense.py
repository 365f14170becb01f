"""Dense-with-zeros export: ``model.safetensors`` (every tensor of the model, pruned entries exact
zeros) plus ``manifest.json``. This is the hand-off between finding sparse weights and running them
fast: any consumer can load it as an ordinary state_dict, and nmsparse's runtime reads the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model
from torch import nn

from .._io import atomic_dir
from ..mask import sliced_satisfies
from .manifest import MANIFEST_NAME, WEIGHTS_NAME, ExportError, entry_patterns, make_manifest, read_manifest

__all__ = ["save_export", "load_export", "verify_weights", "is_export", "open_model", "compare_export", "ExportWriter",
           "SHARD_INDEX_NAME"]

SHARD_INDEX_NAME = "model.safetensors.index.json"  # the Hugging Face name of a sharded checkpoint's index


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def open_model(spec: str, **options: Any) -> tuple[nn.Module, Any]:
    """A model spec as users write it: an export directory (loaded with its weights and manifest),
    or anything :func:`nmsparse.models.build_model` builds (``options`` go to it).

    Returns:
        ``(model, ModelSource)``.
    """
    from ..models import ModelSource, build_model

    if is_export(spec):
        model, manifest = load_export(spec)
        return model, ModelSource(**manifest["model"])
    return build_model(spec, **options)


def save_export(
    model: nn.Module, out_dir: str | Path, layers: list[dict[str, Any]], model_source: dict[str, Any],
    skipped: list[dict[str, str]] | None = None, extra: dict[str, Any] | None = None,
    files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write an export directory atomically (temp directory, then one rename).

    Args:
        model: a squashed model (no parametrizations): its weights are dense with zeros.
        out_dir: final directory; an existing export there is replaced, anything else is refused.
        layers: manifest entries (from :meth:`Sparsifier.squash`).
        model_source: how to rebuild the architecture (:class:`nmsparse.models.ModelSource`).
        skipped: ``[{"fqn": ..., "reason": ...}]`` for layers left dense.
        extra: more manifest keys (e.g. a run's metrics).
        files: extra files written into the export: text (``str``) or bytes (e.g. ``{"report.json": ...}``, plots).

    Raises:
        ExportError: if a layer does not hold its pattern (nothing is written), or the path is taken.
    """
    bad = verify_weights(model, layers)
    if bad:
        raise ExportError(f"refusing to export: {len(bad)} layer(s) break their pattern: {', '.join(bad[:5])}")
    with ExportWriter(out_dir) as writer:
        # "format": "pt" is what transformers' from_pretrained requires of a safetensors file
        save_model(model, str(writer.directory / WEIGHTS_NAME), metadata=SAFETENSORS_METADATA, force_contiguous=True)
        writer.finish(model, layers, model_source, skipped, extra, files)
    return Path(out_dir)


SAFETENSORS_METADATA = {"format": "pt", "producer": "nmsparse-export"}


class ExportWriter:
    """An export directory being written, atomically: a temporary directory beside ``out_dir`` that
    replaces it in one rename when the ``with`` block ends without an error (an existing export there is
    replaced, anything else refused with :class:`ExportError`). The weights are one ``model.safetensors``
    (:func:`save_export`) or shards added one at a time (:meth:`add_shard`, the streamed pipeline, which
    never holds the model); :meth:`finish` writes the shard index, the Hugging Face files, the manifest
    and the report's files."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._context: Any = None
        self.directory = Path()

    def __enter__(self) -> ExportWriter:
        self._context = atomic_dir(self.out_dir, replaceable=is_export)
        try:
            self.directory = self._context.__enter__()
        except FileExistsError as exc:
            raise ExportError(str(exc)) from None
        return self

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self._context.__exit__(*exc_info)

    def add_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` as the shard file ``name`` and record them in the index."""
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(self.directory / name),
                  metadata=SAFETENSORS_METADATA)
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_size += sum(v.numel() * v.element_size() for v in tensors.values())

    def finish(self, model: nn.Module, layers: list[dict[str, Any]], model_source: dict[str, Any],
               skipped: list[dict[str, str]] | None = None, extra: dict[str, Any] | None = None,
               files: dict[str, str | bytes] | None = None) -> None:
        """The rest of the export: the shard index (when shards were added), ``model``'s Hugging Face
        config and tokenizer files (``model`` may live on the meta device), ``files`` and the manifest."""
        if self.weight_map:
            (self.directory / SHARD_INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))},
                indent=1) + "\n")
        _write_hf_files(model, model_source, self.directory)
        for name, content in (files or {}).items():
            if isinstance(content, bytes):
                (self.directory / name).write_bytes(content)
            else:
                (self.directory / name).write_text(content)
        manifest = make_manifest(layers, model_source, skipped, extra)
        (self.directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _weight_files(directory: Path) -> list[str]:
    """The safetensors files of an export: ``model.safetensors``, or a streamed export's shards."""
    if (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    return sorted(set(json.loads((directory / SHARD_INDEX_NAME).read_text())["weight_map"].values()))


# Tensors are read and loaded in parts of about this size, so that loading an export holds one part
# beside the model, not a second copy of every weight (SmolLM2: 538 MB).
LOAD_PART_BYTES = 64 * 1024**2


def _load_shards(model: nn.Module, directory: Path, files: list[str]) -> tuple[list[str], list[str]]:
    """Load safetensors files into ``model`` a part at a time (:data:`LOAD_PART_BYTES`; the state
    dict hooks of the model's modules apply, e.g. Conv1DLinear's layout); tied weights count once.
    Returns ``(missing, unexpected)``."""
    from safetensors import safe_open

    expected = set(model.state_dict())
    seen: set[str] = set()
    for name in files:
        with safe_open(str(directory / name), "pt") as handle:
            part: dict[str, torch.Tensor] = {}
            size = 0
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                part[key] = handle.get_tensor(key)
                size += part[key].numel() * part[key].element_size()
                if size >= LOAD_PART_BYTES:
                    model.load_state_dict(part, strict=False)
                    seen.update(part)
                    part, size = {}, 0
            model.load_state_dict(part, strict=False)
            seen.update(part)
    from ..models import tied_parameter_names

    missing = sorted(expected - seen - tied_parameter_names(model, seen))
    return missing, sorted(seen - expected)


@torch.no_grad()
def compare_export(model: nn.Module, directory: str | Path) -> float:
    """The largest absolute difference between the tensors an export stores (read back one at a time)
    and ``model``'s state dict: 0.0 when the export holds exactly the model's weights. Costs one
    tensor of memory, not a second model.

    Raises:
        ExportError: the export lacks a tensor of the model (a tied one stored once is fine) or holds
            one the model does not have, or a shape differs.
    """
    from safetensors import safe_open

    from ..models import tied_parameter_names

    directory = Path(directory)
    files = _weight_files(directory)
    state = model.state_dict()
    seen: set[str] = set()
    worst = 0.0
    for name in files:
        with safe_open(str(directory / name), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                stored = handle.get_tensor(key)
                mine = state.get(key)
                if mine is None or mine.shape != stored.shape:
                    raise ExportError(f"{directory}: {key} is not a tensor of this shape in the model")
                worst = max(worst, float((mine.float() - stored.float()).abs().max()) if stored.numel() else 0.0)
                seen.add(key)
    missing = sorted(set(state) - seen - tied_parameter_names(model, seen))
    if missing:
        raise ExportError(f"{directory} lacks {missing[:3]}")
    return worst


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _write_hf_files(model: nn.Module, model_source: dict[str, Any], directory: Path) -> None:
    """For a Hugging Face model: its config and the source directory's tokenizer files, so that
    ``AutoModelForCausalLM.from_pretrained(export)`` and ``AutoTokenizer.from_pretrained(export)`` load
    the export directly (weights dense with zeros; tied embeddings stay tied)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return
    data = json.loads(config.to_json_string())  # the user's model config is left as it is
    data["architectures"] = [type(model).__name__]
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    from ..models import ModelSource

    source = ModelSource(str(model_source.get("source", "")))
    if source.is_text:
        import shutil

        root = source.hf_dir
        for name in _TOKENIZER_FILES:
            if (root / name).is_file():
                shutil.copyfile(root / name, directory / name)


@torch.no_grad()
def verify_weights(model: nn.Module, layers: list[dict[str, Any]]) -> list[str]:
    """Names of manifest layers whose weights break their pattern (or are missing / misshapen)."""
    modules = dict(model.named_modules())
    bad = []
    for entry in layers:
        module = modules.get(entry["fqn"])
        weight = getattr(module, entry.get("param", "weight"), None) if module is not None else None
        if not isinstance(weight, torch.Tensor) or list(weight.shape) != list(entry["shape"]):
            bad.append(f"{entry['fqn']} (missing or shape differs)")
        elif not sliced_satisfies(weight, entry_patterns(entry)):
            bad.append(f"{entry['fqn']} ({entry['pattern']})")
    return bad


def load_export(directory: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load an export and verify every layer still holds its pattern.

    Args:
        directory: export directory.
        model: a model of the same architecture to load into; rebuilt from the manifest when None.

    Returns:
        ``(model, manifest)``, the model in eval mode.

    Raises:
        ExportError: missing/corrupt manifest or weights, weights that do not fit the model, or a
            layer that breaks its pattern.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS_NAME
    index = directory / "model.safetensors.index.json"  # a streamed (sharded) export
    if not weights.is_file() and not index.is_file():
        raise ExportError(f"{directory} has no {WEIGHTS_NAME}")
    if model is None:
        from ..models import ModelError, build_model

        source = manifest["model"]
        try:
            options = dict(source.get("options", {}))
            model, _ = build_model(source["source"], num_classes=options.pop("num_classes", None),
                                   in_chans=options.pop("in_chans", None), options=options)
        except ModelError as exc:
            raise ExportError(f"cannot rebuild the exported model: {exc}") from None
    try:
        missing, unexpected = _load_shards(model, directory, _weight_files(directory))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(f"{weights} is corrupt or does not fit the model: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise ExportError(
            f"{weights} does not fit the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    from ..parametrize import attach_input_map

    for entry in manifest["layers"]:  # layers whose input channels are read in a permuted order
        if entry.get("input_permutation") is not None:
            attach_input_map(model.get_submodule(entry["fqn"]), entry["input_permutation"])
    bad = verify_weights(model, manifest["layers"])
    if bad:
        raise ExportError(f"{directory}: {len(bad)} layer(s) break the pattern in the manifest: {', '.join(bad[:5])}")
    model.eval()
    return model, manifest
