"""``nmsparse bench``: dense PyTorch against the sparse runtime, same process, same harness.

Every case is timed with warm-up calls, then ``repeats`` timed calls of dense and sparse, in
alternating blocks of five consecutive calls (the first call of a block untimed) so that drift in
the machine's speed falls on both alike; the report gives the median and the 10th/90th
percentiles. Layer cases with small batches (1 and 8 rows or images) rotate through enough copies
of the weight to exceed the last-level cache, as a real model's layers do,
so they measure memory, not the cache (the report says how many copies). Writes JSON, a Markdown
table and a PNG plot of the speedups.
"""

from __future__ import annotations

import copy
import json
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .mask import compute_mask
from .pattern import parse_pattern
from .progress import Progress
from .runtime import convert
from .runtime.timing import cold_copies, last_level_cache_bytes, rotating
from .runtime.timing import summary as _summary
from .runtime.timing import time_interleaved as _time_interleaved

__all__ = ["LayerCase", "layer_cases", "run_layer_suite", "run_model_suite", "write_report", "last_level_cache_bytes"]


@dataclass(frozen=True)
class LayerCase:
    name: str
    kind: str  # "linear" or "conv"
    in_ch: int
    out_ch: int
    kernel: int = 1
    stride: int = 1
    size: int = 1  # conv input height = width


def layer_cases() -> list[LayerCase]:
    """The layer suite: ResNet-50 convs, ViT-B and MiniLM projections, LLM-sized linears."""
    return [
        LayerCase("resnet50 layer1 conv2 3x3 64->64 @56", "conv", 64, 64, 3, 1, 56),
        LayerCase("resnet50 layer2 conv1 1x1 256->128 @56", "conv", 256, 128, 1, 1, 56),
        LayerCase("resnet50 layer3 conv2 3x3 256->256 @14", "conv", 256, 256, 3, 1, 14),
        LayerCase("resnet50 layer4 conv3 1x1 512->2048 @7", "conv", 512, 2048, 1, 1, 7),
        LayerCase("vit-b qkv 768->2304", "linear", 768, 2304),
        LayerCase("vit-b attn proj 768->768", "linear", 768, 768),
        LayerCase("vit-b mlp fc1 768->3072", "linear", 768, 3072),
        LayerCase("vit-b mlp fc2 3072->768", "linear", 3072, 768),
        LayerCase("minilm ffn 384->1536", "linear", 384, 1536),
        LayerCase("minilm ffn 1536->384", "linear", 1536, 384),
        LayerCase("linear 4096->4096", "linear", 4096, 4096),
        LayerCase("linear 4096->11008", "linear", 4096, 11008),
    ]


def _caller(net: nn.Module, inputs: Any) -> Callable[[int], Any]:
    return (lambda i: net(**inputs)) if isinstance(inputs, dict) else (lambda i: net(inputs))


def _sparse_layer(case: LayerCase, pattern, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    if case.kind == "linear":
        layer = nn.Linear(case.in_ch, case.out_ch)
    else:
        layer = nn.Conv2d(case.in_ch, case.out_ch, case.kernel, case.stride, case.kernel // 2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.02)
        layer.weight.mul_(compute_mask(layer.weight, pattern, absolute=True))
    return layer.eval()


def _fits(case: LayerCase, pattern) -> bool:
    try:
        shape = (
            (case.out_ch, case.in_ch) if case.kind == "linear" else (case.out_ch, case.in_ch, case.kernel, case.kernel)
        )
        pattern.check_shape(shape)
        return True
    except ValueError:
        return False


def run_layer_suite(patterns: list[str], batches: list[int], repeats: int = 20, warmup: int = 3,
                    cases: list[LayerCase] | None = None, progress: str = "auto") -> list[dict[str, Any]]:
    """Time every (case, pattern, batch): dense nn.Linear/Conv2d vs the converted sparse module."""
    llc = last_level_cache_bytes()
    cases = cases or layer_cases()
    plan = [(c, parse_pattern(p), b) for c in cases for p in patterns for b in batches if _fits(c, parse_pattern(p))]
    bar = Progress(len(plan), 0, progress, 1, True)
    rows = []
    for index, (case, pattern, batch) in enumerate(plan):
        dense = _sparse_layer(case, pattern, index)
        weight_bytes = dense.weight.numel() * 4
        rotate = batch <= 8
        sparse = convert(nn.Sequential(copy.deepcopy(dense)), {"0": pattern})[0][0]
        dense_layers = cold_copies(dense, weight_bytes, llc) if rotate else [dense]
        sparse_layers = cold_copies(sparse, sparse.weight_nbytes, llc) if rotate else [sparse]
        if case.kind == "linear":
            x = torch.randn(batch, case.in_ch)
        else:
            x = torch.randn(batch, case.in_ch, case.size, case.size)
        with torch.no_grad():
            err = float((sparse_layers[0](x) - dense_layers[0](x)).abs().max() / dense_layers[0](x).abs().max())
            t_dense, t_sparse = _time_interleaved([rotating(dense_layers, x), rotating(sparse_layers, x)], warmup,
                                                  repeats)
        d, s = _summary(t_dense), _summary(t_sparse)
        rows.append({
            "case": case.name, "pattern": str(pattern), "batch": batch, "dense": d, "sparse": s,
            "speedup": d["median_ms"] / s["median_ms"], "max_rel_error": err,
            "weight_bytes_dense": weight_bytes, "weight_bytes_sparse": sparse_layers[0].weight_nbytes,
            "rotated_copies": {"dense": len(dense_layers), "sparse": len(sparse_layers)} if rotate else None,
        })
        bar.update(index + 1, f"{case.name} {pattern} b{batch}: {rows[-1]['speedup']:.2f}x")
        del dense_layers, sparse_layers
    bar.close()
    return rows


def _model(name: str, batch: int = 1):
    """``(model, example input, Selection)`` of a model-suite entry (random weights, offline)."""
    from .models import build_model, example_input
    from .select import Selection

    if name == "minilm":
        model, source = build_model("hf:minilm")
        layers: tuple[str, ...] = ("ff", "attention")
    else:
        model, source = build_model(f"timm:{name}")
        layers = ("conv",) if "resnet" in name else ("ff", "attention")
    model.eval()
    return model, example_input(model, source, batch=batch), Selection(layers=layers)


def _dense_folded(model: nn.Module) -> nn.Module | None:
    """The dense model with its batch norms folded into the convolutions before them (PyTorch's own
    ``torch.fx.experimental.optimization.fuse``): the baseline that gets the same folding the sparse
    runtime does, so the speedup that sparsity alone brings is in the report too. None for models
    without batch norm or that do not trace."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return None
    from torch.fx.experimental.optimization import fuse as fx_fuse

    try:
        return fx_fuse(copy.deepcopy(model))
    except Exception:  # noqa: BLE001 - an untraceable model just has no folded baseline
        return None


def run_model_suite(patterns: list[str], models: list[str], repeats: int = 10, warmup: int = 2,
                    progress: str = "auto", batches: tuple[int, ...] = (1, 32), choose: bool = True,
                    ) -> list[dict[str, Any]]:
    """End-to-end latency and throughput of whole models at each batch: dense vs magnitude-pruned and
    converted. With ``choose`` (the default) ``convert`` times every layer at the model's real input
    of that batch and keeps the faster of dense and sparse (the row counts both); without it every
    eligible layer runs sparse."""
    from .oneshot import PruneConfig, prune

    rows = []
    plan = [(m, p, b) for m in models for p in patterns for b in batches]
    bar = Progress(len(plan), 0, progress, 1, True)
    for index, (name, spec, batch) in enumerate(plan):
        model, inputs, selection = _model(name, batch)
        result = prune(model, PruneConfig(spec, "magnitude", selection))
        dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        sparse_model, conv_rows = convert(copy.deepcopy(model), {e["fqn"]: e["pattern"] for e in result.layers},
                                          infer=False, example_inputs=inputs if choose else None,
                                          repeats=max(4, repeats // 2))
        folded = _dense_folded(model)
        callers = [_caller(model, inputs), _caller(sparse_model, inputs)]
        if folded is not None:
            callers.append(_caller(folded, inputs))
        with torch.no_grad():
            times = [_summary(t) for t in _time_interleaved(callers, warmup, repeats)]
        t_dense, t_sparse = times[0], times[1]
        t_folded = times[2] if folded is not None else None
        converted = [r for r in conv_rows if r.converted]
        sparse_bytes = dense_bytes - sum(r.dense_bytes - r.packed_bytes for r in converted)
        rows.append({"model": name, "pattern": spec, "layers": ",".join(selection.layers), "batch": batch,
                     "dense": t_dense, "sparse": t_sparse, "speedup": t_dense["median_ms"] / t_sparse["median_ms"],
                     "dense_items_per_s": 1e3 * batch / t_dense["median_ms"],
                     "sparse_items_per_s": 1e3 * batch / t_sparse["median_ms"],
                     "dense_bn_folded": t_folded,
                     "speedup_vs_bn_folded": t_folded["median_ms"] / t_sparse["median_ms"] if t_folded else None,
                     "fused_layers": sum(bool(r.fused) for r in converted), "layer_choice": choose,
                     "kept_dense_by_choice": sum(r.reason.startswith("kept dense") for r in conv_rows),
                     "converted_layers": len(converted), "sparse_layers": len(result.layers),
                     "weight_bytes_dense": dense_bytes, "weight_bytes_sparse": sparse_bytes,
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        bar.update(index + 1, f"{name} {spec} b{batch}: {rows[-1]['speedup']:.2f}x")
        del model, sparse_model
    bar.close()
    return rows


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, suite: str, meta: dict[str, Any]) -> dict[str, Path]:
    """JSON, Markdown and PNG of a suite's rows."""
    from ._io import atomic_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"bench_{suite}.json", "md": out / f"bench_{suite}.md", "png": out / f"bench_{suite}.png"}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    key = "case" if suite == "layers" else "model"
    folded = suite == "models"
    lines = [f"kernels {meta.get('isa')} ({meta.get('cpu', '')}), threads {meta['threads']}, float32; {meta['note']}",
             "",
             f"| {key} | pattern | batch | dense ms (p10-p90) | sparse ms (p10-p90) | speedup |"
             + (" items/s dense -> sparse | layers sparse (kept dense by choice) |"
                " dense, BN folded ms | speedup vs BN-folded dense |" if folded else "")
             + " weight MB dense -> sparse |" + (" process peak RSS MB |" if folded else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|---|" if folded else "") + "---|" + ("---|" if folded else "")]

    def span(t: dict[str, float]) -> str:
        return f"{t['median_ms']:.3f} ({t['p10_ms']:.3f}-{t['p90_ms']:.3f})"

    for r in rows:
        extra = ""
        if folded:
            f = r.get("dense_bn_folded")
            extra = (f" {r['dense_items_per_s']:.1f} -> {r['sparse_items_per_s']:.1f} |"
                     f" {r['converted_layers']}/{r['sparse_layers']} ({r.get('kept_dense_by_choice', 0)}) |")
            extra += f" {span(f)} | {r['speedup_vs_bn_folded']:.2f}x |" if f else " - | - |"
        rss = f" {r['peak_rss_mb']:.0f} |" if folded else ""
        same = folded and r.get("converted_layers") == 0  # layer choice kept every layer dense
        speed = f"{r['speedup']:.2f}x" + (" (no layer sparse: the dense model against itself)" if same else "")
        lines.append(f"| {r[key]} | {r['pattern']} | {r['batch']} | {span(r['dense'])} | {span(r['sparse'])} "
                     f"| {speed} |{extra} {r['weight_bytes_dense'] / 1e6:.1f} -> "
                     f"{r['weight_bytes_sparse'] / 1e6:.1f} |{rss}")
    with atomic_file(paths["md"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _plot(rows, key, paths["png"])
    return paths


def _plot(rows: list[dict[str, Any]], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r[key]} | {r['pattern']} | b{r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.2))
    colors = ["#4c72b0" if r["speedup"] >= 1 else "#c44e52" for r in rows]
    ax.barh(labels[::-1], [r["speedup"] for r in rows][::-1], color=colors[::-1])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup over dense PyTorch (median)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_name() -> str:
    import platform

    from .env import cpuinfo_line

    line = cpuinfo_line("model name", "Model")
    return line.split(":", 1)[1].strip() if line else platform.processor() or platform.machine()


def machine_meta(threads: int, note: str) -> dict[str, Any]:
    """The run's machine: threads, versions, CPU, cache, and the ISA the sparse kernels were built for."""
    from .runtime import _native

    status = _native.status()
    return {
        "threads": threads,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "isa": status["isa"] or f"none ({status['reason']})",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "note": note,
    }
