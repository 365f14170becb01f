"""One-shot pruning of a causal LM larger than memory: one decoder block at a time from safetensors.

As SparseGPT does on a GPU, only one block's weights are materialised at a time: the model skeleton
is built on PyTorch's ``meta`` device (shapes only); the embeddings, final norm and head are loaded
in a one-block copy of the model that captures the first block's inputs; then each block is
materialised from the shards, calibrated on the current inputs, pruned, run to give the next block
its inputs, written to its own output shard, and released. Peak memory is the embeddings and head
plus one block, the calibration activations and one layer's statistics -- not the model.

The output is a sharded Hugging Face directory (``model-XXXXX-of-YYYYY.safetensors`` with
``model.safetensors.index.json``, config, tokenizer) plus nmsparse's manifest and report:
``AutoModelForCausalLM.from_pretrained`` and :func:`nmsparse.export.load_export` read it.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..export.dense import SHARD_INDEX_NAME, ExportWriter
from ..export.manifest import layer_entry
from ..method import MethodError, build_method
from ..parametrize import input_map
from ..pattern import Pattern, parse_pattern
from ..progress import Progress
from ..select import Selection, select_layers
from .calibrate import find_blocks, first_block_inputs, prune_blocks, release_freed_memory
from .result import PruneResult

__all__ = ["prune_streaming"]


class _Shards:
    """Tensor name -> the safetensors file holding it, over one file or an index of shards."""

    def __init__(self, directory: Path) -> None:
        index = directory / SHARD_INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: directory / name for key, name in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(directory / "model.safetensors"), "pt") as handle:
                self.files = {key: directory / "model.safetensors" for key in handle.keys()}  # noqa: SIM118
        else:
            raise MethodError(f"{directory} holds no model.safetensors or {SHARD_INDEX_NAME}; streaming reads "
                              "safetensors")

    def load_into(self, module: nn.Module, prefix: str, skip: str | None = None, strict: bool = False) -> None:
        """Copy the tensors named ``prefix + name`` into ``module``'s parameters and buffers (names
        starting with ``skip`` are left alone).

        Raises:
            MethodError: with ``strict``, when a parameter or buffer of ``module`` is not in the files
                (a block materialised from ``meta`` would otherwise keep uninitialised memory there).
        """
        from safetensors import safe_open

        from ..models import Conv1DLinear

        wanted = dict(module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False))
        wanted.update(dict(module.named_buffers(prefix=prefix.rstrip("."), remove_duplicate=False)))
        # GPT-2's Conv1D weights are stored [in, out]; as Conv1DLinear they hold [out, in]
        transposed = {f"{prefix}{name}.weight" if name else f"{prefix}weight"
                      for name, m in module.named_modules() if isinstance(m, Conv1DLinear)}
        by_file: dict[Path, list[str]] = {}
        for key in wanted:
            if key in self.files and not (skip and key.startswith(skip)):
                by_file.setdefault(self.files[key], []).append(key)
        with torch.no_grad():
            for path, keys in by_file.items():
                with safe_open(str(path), "pt") as handle:
                    for key in keys:
                        tensor = handle.get_tensor(key)
                        wanted[key].copy_(tensor.t() if key in transposed else tensor)
        if strict:
            absent = sorted(k for k in wanted if k not in self.files)
            if absent:
                raise MethodError(f"cannot stream this model: {', '.join(absent[:4])} are not in its weights (e.g. "
                                  "buffers computed at construction); prune it without --stream")


def prune_streaming(
    directory: str | Path,
    out: str | Path,
    pattern: str | Pattern = "2:4",
    method: str = "sparsegpt",
    calibration: list[Any] | None = None,
    selection: Selection | None = None,
    method_options: dict[str, Any] | None = None,
    progress: str = "auto",
    micro_batch: int | None = 4,
    sequential: bool = False,
) -> PruneResult:
    """Prune the causal LM in the Hugging Face directory ``directory`` block by block into ``out``.

    Args:
        directory: a causal-LM directory with ``config.json`` and safetensors weights (one file or shards).
        out: the output directory (written atomically; an existing nmsparse export there is replaced).
        pattern / method / selection / method_options: as :func:`nmsparse.oneshot.prune`; every
            selected layer must be inside the decoder blocks (the LM head stays dense by default).
        calibration: calibration batches (dicts of ``input_ids`` / ``attention_mask``); ``magnitude``
            needs none.
        sequential: calibrate each block's layers group by group in call order (as in-memory pruning).

    Returns:
        :class:`PruneResult` (``export`` set). Fidelity is not measured here (it needs the whole
        model): run ``nmsparse eval OUT --perplexity ...``.

    Raises:
        MethodError: not a causal LM, no safetensors, a training method, or a selected layer outside
            the decoder blocks.
    """
    from transformers import AutoConfig

    from .report import report_files

    directory, out = Path(directory), Path(out)
    built = build_method(method, method_options)
    if not built.one_shot:
        raise MethodError(f"method {method!r} trains masks; use it with `nmsparse train`, not one-shot pruning")
    if method != "magnitude" and not calibration:
        raise MethodError(f"method {method!r} needs calibration data")
    if sequential and not calibration:
        raise MethodError("sequential calibration needs calibration data")
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    shards = _Shards(directory)
    skeleton, choices, blocks = _skeleton(config, selection, pattern)
    selected = [c for c in choices if c.selected]
    prefix = blocks[0][0].rsplit(".", 1)[0]  # "model.layers"
    shell = _shell(config, shards, prefix)
    start = time.perf_counter()
    text = str(parse_pattern(pattern)) if isinstance(pattern, str) else str(pattern)
    with ExportWriter(out) as writer:
        stream = _BlockShards(shards, shell, prefix, writer, len(blocks) + 1)
        bar = Progress(len(blocks), 0, progress, every=1)
        rows, _ = prune_blocks(blocks, selected, built, stream.capture(calibration) if calibration else None,
                               micro_batch, False, bar, before=stream.materialise, after=stream.write_and_release,
                               sequential=sequential)
        bar.close()
        stream.write_outside_blocks(config.tie_word_embeddings)
        source = {"source": f"hf:{directory}", "options": {}}
        skipped = [{"fqn": c.fqn, "reason": c.skip_reason or ""} for c in choices if not c.selected]
        result = PruneResult(stream.layers, rows, skipped, method, text,
                             calibration={"batches": len(calibration or []),
                                                                  "sequential": sequential}, export=str(out))
        writer.finish(skeleton, stream.layers, source, skipped,
                      {"method": method, "streamed": True, "seconds": round(time.perf_counter() - start, 1)},
                      report_files(result.as_dict()))
    return result


class _BlockShards:
    """The streamed blocks' hooks of :func:`~nmsparse.oneshot.calibrate.prune_blocks`: each block is
    materialised from the input shards into the skeleton's slot, and after pruning written to its own
    output shard (``model-{index + 2}-of-{count}``; shard 1 holds what lies outside the blocks) and
    released."""

    def __init__(self, shards: _Shards, shell: nn.Module, prefix: str, writer: ExportWriter, count: int) -> None:
        self.shards, self.shell, self.prefix, self.writer, self.count = shards, shell, prefix, writer, count
        self.slot = shell.get_submodule(prefix)
        self.layers: list[dict[str, Any]] = []

    def materialise(self, index: int, block_fqn: str, block: nn.Module, here: list) -> None:
        block.to_empty(device="cpu")  # the skeleton's own block, materialised in place
        self.shards.load_into(block, f"{block_fqn}.", strict=True)
        block.eval()

    def capture(self, calibration: list[Any]):
        def first_inputs(block: nn.Module) -> list:
            self.slot[0] = block
            return first_block_inputs(self.shell, block, calibration)
        return first_inputs

    def write_and_release(self, index: int, block_fqn: str, block: nn.Module, here: list) -> None:
        self.layers.extend(layer_entry(c.fqn, c.module.weight, c.patterns, input_map(c.module)) for c in here)
        self.writer.add_shard(f"model-{index + 2:05d}-of-{self.count:05d}.safetensors",
                              {f"{block_fqn}.{k}": v for k, v in block.state_dict().items()})
        block.to(device="meta")  # release the block's memory
        self.slot[0] = block
        release_freed_memory()

    def write_outside_blocks(self, tied: bool) -> None:
        """Shard 1 of ``count``: every tensor outside the block list (one copy of a tied head, as
        save_pretrained writes)."""
        rest = {k: v for k, v in self.shell.state_dict().items() if not k.startswith(self.prefix + ".")}
        head = self.shell.get_output_embeddings()
        if tied and head is not None:
            rest.pop(_head_prefix(self.shell, head) + "weight", None)
        self.writer.add_shard(f"model-00001-of-{self.count:05d}.safetensors", rest)


def _skeleton(config: Any, selection: Selection | None, pattern: str | Pattern):
    """``(skeleton, layer choices, decoder blocks)``: the model on the ``meta`` device (shapes and names
    only, no memory) and its selection, checked to lie inside the decoder blocks.

    Raises:
        MethodError: no decoder block list holds the selected layers, or some lie outside it.
    """
    from transformers import AutoModelForCausalLM

    from ..models import conv1d_as_linear

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    conv1d_as_linear(skeleton)  # GPT-2 family: as build_model does (their state_dict keeps the Conv1D layout)
    choices = select_layers(skeleton, selection or Selection(), pattern)
    selected = [c for c in choices if c.selected]
    blocks = find_blocks(skeleton, [c.fqn for c in selected])
    if blocks is None:
        raise MethodError("streaming needs a decoder block list holding the selected layers")
    prefix = blocks[0][0].rsplit(".", 1)[0]
    outside = [c.fqn for c in selected if not c.fqn.startswith(prefix + ".")]
    if outside:
        raise MethodError(f"streaming prunes decoder blocks only; these selected layers are outside them: "
                          f"{', '.join(outside[:5])} (skip them with a rule, or prune without --stream)")
    return skeleton, choices, blocks


def _shell(config: Any, shards: _Shards, prefix: str) -> nn.Module:
    """The model with one block: embeddings, norms, head (and e.g. rotary tables) built for real and
    loaded from the shards; its block slot takes each streamed block in turn."""
    from transformers import AutoModelForCausalLM

    from ..models import conv1d_as_linear

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if hasattr(one, "layer_types") and getattr(one, "layer_types", None):
        one.layer_types = one.layer_types[:1]
    shell = AutoModelForCausalLM.from_config(one, dtype=torch.float32).eval()
    conv1d_as_linear(shell)
    for name, module in shell.named_children():  # load everything but the block list
        shards.load_into(module, f"{name}.", skip=prefix + ".")
    if config.tie_word_embeddings:
        shell.tie_weights()
    return shell


def _head_prefix(model: nn.Module, head: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    return "\0"
