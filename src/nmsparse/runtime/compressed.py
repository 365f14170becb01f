"""The compressed export layout: kept values plus compact indices, with the manifest.

``model.safetensors`` holds, for every converted layer, ``<fqn>.vals`` and ``<fqn>.cols`` (1xN
blocks) or ``<fqn>.codes`` (n:m offsets, ceil(log2 m) bits each, the in-memory layout of
:class:`~nmsparse.runtime.formats.NMPacked`), and every other tensor as in a dense
export. ``manifest.json`` is the dense export's manifest with ``layout: compressed`` and, per
converted layer, how it was packed. :func:`load_compressed` rebuilds the architecture from the
manifest's model source and puts the packed layers in place: it needs the model library (timm,
torchvision or transformers), safetensors and a C++ compiler for the kernels (without one the packed
layers load dense), not nmsparse's training stack.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_dir
from ..export.manifest import MANIFEST_NAME, WEIGHTS_NAME, ExportError
from . import _native
from .convert import convert
from .formats import BlockPacked, NMPacked
from .modules import QuantLinear, SparseConv2d, SparseLinear

__all__ = ["save_compressed", "load_compressed", "LAYOUT"]

LAYOUT = "compressed"


def _is_compressed(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST_NAME).read_text()).get("layout") == LAYOUT
    except (OSError, ValueError):
        return False


def save_compressed(export_dir: str | Path, out_dir: str | Path, example_inputs: Any = None,
                    keep_dense: dict[str, str] | None = None, min_speedup: float = 1.05, weights: str = "fp32",
                    group_size: int = 64) -> dict[str, Any]:
    """Write the compressed layout of a (dense-with-zeros) export; returns the size report.

    Args:
        example_inputs: time every layer dense and sparse at this input (see :func:`convert`) and
            store the layers that measured slower sparse as dense; the choice is saved in the
            manifest (``kept_dense``: fqn -> reason with the measured ratio) and kept on reload.
        keep_dense: ``{fqn: reason}`` of layers to store dense whatever they measure.
        weights / group_size: ``"int8"`` / ``"int4"``: store every Linear quantized as
            :func:`~nmsparse.runtime.convert.convert` runs it (integers, float16 scales, the sparse
            layers' index codes); the report adds ``sparse_layers_ratio``, the pruned layers' bytes
            against their float32 dense bytes.

    Raises:
        KernelsUnavailable: the kernels cannot be built here (packing needs their layouts' checks).
    """
    from safetensors.torch import save_file

    from ..export import read_manifest

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = read_manifest(export_dir)
    _native.require()
    # patterns from the manifest; state dict kept whole (no fusion)
    model, rows = convert(export_dir, infer=False, fuse=False, example_inputs=example_inputs, keep_dense=keep_dense,
                          min_speedup=min_speedup, weights=weights, group_size=group_size, decode=False)
    kept = {r.fqn: r.reason for r in rows if not r.converted and r.pattern
            and (r.reason.startswith("kept dense") or r.fqn in (keep_dense or {}))}
    packing = {}
    quantized: dict[str, torch.Tensor] = {}
    for fqn, module in model.named_modules():
        if isinstance(module, QuantLinear):
            packing[fqn] = _quant_entry(module)
            quantized[f"{fqn}.scales"] = module.scales.half()  # float16, as the layout holds them
        elif isinstance(module, (SparseLinear, SparseConv2d)):
            packed = module.packed
            perm = None if module.input_perm is None else [int(i) for i in module.input_perm]
            packing[fqn] = {"kind": module.kind, "order": getattr(module, "order", "chw"), "shape": list(packed.shape),
                            "input_permutation": perm,
                            **({"n": packed.n, "m": packed.m, "offset_bits": packed.bits, "chunk": packed.chunk}
                               if isinstance(packed, NMPacked) else {"block": packed.block})}
    from ..models import tied_parameter_names

    tied = tied_parameter_names(model)  # a tied matrix (LM head = embeddings) is stored once
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    state.update(quantized)
    new_manifest = dict(manifest, layout=LAYOUT, packing=packing, kept_dense=kept)
    with atomic_dir(out_dir, replaceable=_is_compressed) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        (tmp / MANIFEST_NAME).write_text(json.dumps(new_manifest, indent=1) + "\n")
    dense_size = sum(f.stat().st_size for f in export_dir.glob("*.safetensors"))  # one file, or streamed shards
    size = (out_dir / WEIGHTS_NAME).stat().st_size
    report = {"dense_bytes": dense_size, "compressed_bytes": size, "ratio": size / dense_size,
              "packed_layers": len(packing), "kept_dense": kept, "weights": weights,
              "layers_left_dense": [r.as_dict() for r in rows if not r.converted and r.pattern]}
    sparse = [fqn for fqn, info in packing.items() if info.get("layout", info["kind"]) != "dense"]
    if weights != "fp32" and sparse:
        stored = sum(_stored_bytes(state, fqn) for fqn in sparse)
        fp32 = sum(4 * packing[fqn]["shape"][0] * packing[fqn]["shape"][1] for fqn in sparse)
        report["sparse_layers_bytes"], report["sparse_layers_fp32_bytes"] = stored, fp32
        report["sparse_layers_ratio"] = stored / fp32
    return report


def _quant_entry(module: QuantLinear) -> dict[str, Any]:
    packed = module._packed
    entry: dict[str, Any] = {"kind": "quant", "layout": module.kind, "shape": list(module._packed.shape),
                             "bits": module.bits, "group": module.group, "activation_block": module.act_block,
                             "input_permutation": None if module.input_perm is None else
                             [int(i) for i in module.input_perm]}
    if module.kind == "nm":
        entry.update(n=module.n, m=module.m, offset_bits=packed.index.bits, chunk=packed.index.chunk)
    elif module.kind == "block":
        entry["block"] = module.block
    return entry


def _stored_bytes(state: dict[str, torch.Tensor], fqn: str) -> int:
    """Bytes of a packed layer's stored tensors (values, scales, index codes; not the bias)."""
    return sum(
        t.numel() * t.element_size()
        for k, t in state.items()
        if k.startswith(fqn + ".") and k[len(fqn) + 1 :] in ("qweight", "scales", "index", "vals", "codes", "cols")
    )


@torch.no_grad()
def _unpack_into(module: nn.Module, packed: Any, order: str, bias: torch.Tensor | None, perm: list[int] | None) -> None:
    """Put a packed weight back into its dense module (no kernels here): the same function, dense speed."""
    matrix = packed.dense()
    if perm is not None:  # the packed weight reads inputs through a gather: scatter its columns back
        if module.weight.dim() != 2:
            raise ExportError("a permuted convolution cannot be unpacked without the kernels")
        unpermuted = torch.zeros_like(matrix)
        unpermuted[:, torch.as_tensor(perm)] = matrix
        matrix = unpermuted
    weight = module.weight
    if weight.dim() == 4 and order == "hwc":
        out, c, kh, kw = weight.shape
        matrix = matrix.view(out, kh, kw, c).permute(0, 3, 1, 2)
    weight.copy_(matrix.reshape(weight.shape))
    if bias is not None and module.bias is not None:
        module.bias.copy_(bias)


def _load_quant(model: nn.Module, fqn: str, module: nn.Module, info: dict[str, Any], state: dict[str, torch.Tensor],
                unavailable: str) -> None:
    """Put a quantized layer of a compressed export in place (or its dequantized weight, without kernels)."""
    from .quant import QPacked

    shape = tuple(info["shape"])
    q = state.pop(f"{fqn}.qweight").numpy().copy()
    scales = state.pop(f"{fqn}.scales").half().numpy().copy()
    index = state.pop(f"{fqn}.index").numpy().copy()
    bias = state.pop(f"{fqn}.bias", None)
    layout = info["layout"]
    if layout == "nm":
        holder: Any = NMPacked(index, np.zeros(0, np.float32), info["n"], info["m"], shape)
        if info.get("chunk") != holder.chunk or info.get("offset_bits") != holder.bits:
            raise ExportError(
                f"{fqn}: the file's n:m layout is not the one this nmsparse reads; compress the export again"
            )
    elif layout == "block":
        holder = BlockPacked(index, np.zeros((index.shape[0], index.shape[1], 0), np.float32), shape)
    else:
        holder = None
    packed = QPacked(layout, holder, q, scales, int(info["bits"]), int(info["group"]), shape)
    perm = info.get("input_permutation")
    if unavailable:
        _unpack_into(module, packed, "chw", bias, perm)
        return
    acts = "int8" if info.get("activation_block") else "fp32"
    model.set_submodule(fqn, QuantLinear(packed, bias, perm, acts))


@torch.no_grad()
def load_compressed(directory: str | Path, fuse: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a compressed export, packed layers running on the CPU kernels.

    With ``fuse``, batch norms and ReLUs that follow packed layers are folded into them
    (:func:`nmsparse.runtime.fuse.fuse`), as :func:`~nmsparse.runtime.convert.convert` does. Layers
    the file keeps dense (``kept_dense``: a measured choice) load dense. Where the kernels cannot be
    built here, packed layers are unpacked into their dense modules (same outputs, dense speed) and a
    warning says why.

    Raises:
        ExportError: not a compressed export, or tensors that do not fit the architecture.
    """
    from safetensors.torch import load_file

    from ..models import ModelError, build_model, tied_parameter_names

    directory = Path(directory)
    if not _is_compressed(directory):
        raise ExportError(f"{directory} is not a compressed nmsparse export (manifest layout != '{LAYOUT}')")
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    options = dict(manifest["model"].get("options", {}))
    try:
        model, _ = build_model(manifest["model"]["source"], num_classes=options.pop("num_classes", None),
                               in_chans=options.pop("in_chans", None), options=options)
    except ModelError as exc:
        raise ExportError(f"cannot rebuild the exported model: {exc}") from None
    state = load_file(str(directory / WEIGHTS_NAME))
    try:
        _native.require()
        unavailable = ""
    except _native.KernelsUnavailable as exc:
        unavailable = str(exc)
        warnings.warn(f"{exc}; packed layers of {directory} run dense", RuntimeWarning, stacklevel=2)
    for fqn, info in manifest["packing"].items():
        module = model.get_submodule(fqn)
        shape = tuple(info["shape"])
        if info["kind"] == "quant":
            _load_quant(model, fqn, module, info, state, unavailable)
            continue
        vals = state.pop(f"{fqn}.vals").numpy().copy()
        if info["kind"] == "block":
            packed: Any = BlockPacked(state.pop(f"{fqn}.cols").numpy().copy(), vals, shape)
        else:
            packed = NMPacked(state.pop(f"{fqn}.codes").numpy().copy(), vals, info["n"], info["m"], shape)
            if info.get("chunk") != packed.chunk or info.get("offset_bits") != packed.bits:
                raise ExportError(
                    f"{fqn}: the file's n:m layout (chunk {info.get('chunk')}, {info.get('offset_bits')} "
                    f"bits) is not the one this nmsparse reads (chunk {packed.chunk}, {packed.bits} bits); "
                    "compress the export again"
                )
        bias = state.pop(f"{fqn}.bias", None)
        perm = info.get("input_permutation")
        if unavailable:
            _unpack_into(module, packed, info["order"], bias, perm)
            continue
        new = (SparseLinear(packed, bias, perm) if isinstance(module, nn.Linear)
               else SparseConv2d(packed, bias, module, info["order"], perm))
        model.set_submodule(fqn, new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # popped above, or filled by _unpack_into
    packed_keys = {f"{f}.{k}" for f in manifest["packing"]
                   for k in ("vals", "cols", "codes", "bias", "weight", "qweight", "scales", "index")}
    tied = tied_parameter_names(model, set(state))
    missing = [k for k in missing if k not in packed_keys and k not in tied]
    if missing or unexpected:
        raise ExportError(
            f"compressed weights do not fit the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    if fuse:
        from .fuse import fuse as fuse_following

        fuse_following(model)
    return model, manifest
