"""Decoding benchmark of causal LMs on the CPU: greedy generation at batch 1 with the KV cache, dense
against the model pruned (magnitude, dense with zeros) and converted to the sparse runtime.

For each model and pattern: time to first token (the prefill of the prompt), tokens per second of
the decode that follows, and whether the converted model generates exactly the tokens the
dense-with-zeros model does (it must: the runtime computes the same function).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from .progress import Progress

__all__ = ["decode_model_spec", "run_decode_suite", "decode_report_lines"]

# model-suite names that are causal LMs (anything spelled hf:DIR or gguf:FILE is one too)
_NAMED = {"smollm2": "gguf:smollm2"}


def decode_model_spec(name: str) -> str | None:
    """The model spec of a decoding-suite entry, or None when ``name`` is not a causal LM entry."""
    if name in _NAMED:
        return _NAMED[name]
    return name if name.startswith(("hf:", "gguf:")) else None


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=0)
    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


def _layer_ms_per_token(model: nn.Module, fqns: list[str], prompt: torch.Tensor, new_tokens: int) -> float:
    """Milliseconds per decode step spent inside the modules ``fqns`` (the pruned layers, sparse or
    kept dense), from forward hooks on a separate generation (hooks cost a little, so the timed runs
    carry none): what sparsity can shorten; the rest of a step (the LM head, attention, norms, the
    generation loop) is the same in both models."""
    spent = [0.0]

    def pre(module, args):
        module.__dict__["_bench_t0"] = time.perf_counter() if args[0].shape[:-1].numel() == 1 else None

    def post(module, args, output):
        if (t0 := module.__dict__.pop("_bench_t0", None)) is not None:
            spent[0] += time.perf_counter() - t0

    handles = []
    for fqn in fqns:
        module = model.get_submodule(fqn)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        _generate(model, prompt, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return 1e3 * spent[0] / max(1, new_tokens - 1)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_decode_suite(models: list[str], patterns: list[str], prompt_tokens: int = 128, new_tokens: int = 128,
                     repeats: int = 3, choose: bool = True, progress: str = "auto") -> list[dict[str, Any]]:
    """Rows of ``{model, pattern, batch, prompt_tokens, new_tokens, dense/sparse ttft_ms and tokens_per_s,
    speedup (decode tokens/s), ttft_speedup, same_tokens, converted_layers, sparse_layers,
    dense/sparse layers_ms, layers_speedup, ceiling}``: ``*_layers_ms`` is a decode step's time inside
    the pruned layers, ``ceiling`` the speedup with those layers taking no time (Amdahl's bound).

    With ``choose`` each layer is timed dense vs sparse at the decode step's input (one token) and the
    faster is kept (:func:`nmsparse.runtime.convert`); the decoder's Linears are pruned (attention and
    feed-forward), the LM head and embeddings stay dense.
    """
    from .models import build_model
    from .oneshot import prune
    from .oneshot.data import heldout_text, load_tokenizer, token_ids
    from .runtime import convert
    from .select import Selection

    rows = []
    plan = [(m, p) for m in models for p in patterns]
    bar = Progress(len(plan), 0, progress, 1, True)
    loaded: dict[str, Any] = {}
    for index, (name, pattern) in enumerate(plan):
        spec = decode_model_spec(name) or name
        if spec not in loaded:
            dense, source = build_model(spec)
            ids = token_ids(load_tokenizer(source.source[3:]), heldout_text(), prompt_tokens)
            loaded = {spec: (dense.eval(), ids.unsqueeze(0))}  # one model resident at a time
        dense, prompt = loaded[spec]
        pruned = copy.deepcopy(dense)
        result = prune(pruned, pattern, "magnitude", Selection(layers=("ff", "attention")), progress="none")
        example = {"input_ids": prompt[:, :1]} if choose else None  # a decode step: one token
        sparse, conv_rows = convert(copy.deepcopy(pruned), {e["fqn"]: e["pattern"] for e in result.layers},
                                    infer=False, example_inputs=example, repeats=6)
        same = bool(torch.equal(_generate(pruned, prompt, new_tokens), _generate(sparse, prompt, new_tokens)))
        del pruned
        times: dict[str, dict[str, list[float]]] = {k: {"first": [], "all": []} for k in ("dense", "sparse")}
        for r in range(repeats):  # interleaved, alternating order: drift falls on both alike
            for key, model in (("dense", dense), ("sparse", sparse)) if r % 2 == 0 else (("sparse", sparse), ("dense", dense)):
                times[key]["first"].append(_timed(lambda m=model, p=prompt: _generate(m, p, 1)))
                times[key]["all"].append(_timed(lambda m=model, p=prompt: _generate(m, p, new_tokens)))
        out: dict[str, Any] = {"model": name, "pattern": pattern, "batch": 1, "prompt_tokens": int(prompt.shape[1]),
                               "new_tokens": new_tokens, "same_tokens": same, "layer_choice": choose,
                               "converted_layers": sum(bool(r.converted) for r in conv_rows),
                               "sparse_layers": len(result.layers)}
        for key in ("dense", "sparse"):
            first = statistics.median(times[key]["first"])
            decode = statistics.median(a - f for a, f in zip(times[key]["all"], times[key]["first"]))
            out[f"{key}_ttft_ms"] = round(1e3 * first, 2)
            out[f"{key}_tokens_per_s"] = round((new_tokens - 1) / decode, 2)
        out["speedup"] = round(out["sparse_tokens_per_s"] / out["dense_tokens_per_s"], 3)
        # where a decode step's time goes: the pruned layers against everything else (the ceiling is
        # the speedup the model would show if its sparse layers took no time at all)
        fqns = [e["fqn"] for e in result.layers]
        steps = min(new_tokens, 32)
        for key, model in (("dense", dense), ("sparse", sparse)):
            out[f"{key}_layers_ms"] = round(_layer_ms_per_token(model, fqns, prompt, steps), 2)
        token_ms = 1e3 / out["dense_tokens_per_s"]
        out["layers_speedup"] = round(out["dense_layers_ms"] / out["sparse_layers_ms"], 3)
        out["ceiling"] = round(token_ms / max(1e-9, token_ms - out["dense_layers_ms"]), 2)
        out["ttft_speedup"] = round(out["dense_ttft_ms"] / out["sparse_ttft_ms"], 3)
        rows.append(out)
        bar.update(index + 1, f"{name} {pattern}: {out['speedup']:.2f}x tokens/s")
        del sparse
    bar.close()
    return rows


def decode_report_lines(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The Markdown table of a decoding run."""
    lines = [f"kernels {meta.get('isa')} ({meta.get('cpu', '')}), threads {meta['threads']}, float32; {meta['note']}",
             "", "| model | pattern | prompt + new tokens | dense tokens/s | sparse tokens/s | speedup | dense TTFT ms "
             "| sparse TTFT ms | TTFT speedup | same tokens | layers sparse | pruned layers ms/token (dense -> sparse) "
             "| ceiling |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pattern']} | {r['prompt_tokens']} + {r['new_tokens']} | "
                     f"{r['dense_tokens_per_s']:.1f} | {r['sparse_tokens_per_s']:.1f} | {r['speedup']:.2f}x"
                     f"{' (no layer sparse: the dense model against itself)' if r['converted_layers'] == 0 else ''} | "
                     f"{r['dense_ttft_ms']:.0f} | {r['sparse_ttft_ms']:.0f} | {r['ttft_speedup']:.2f}x | "
                     f"{'yes' if r['same_tokens'] else 'NO'} | {r['converted_layers']}/{r['sparse_layers']} | "
                     f"{r['dense_layers_ms']:.1f} -> {r['sparse_layers_ms']:.1f} ({r['layers_speedup']:.2f}x) | "
                     f"{r['ceiling']:.2f}x |")
    return lines


def write_decode_report(rows: list[dict[str, Any]], out_dir, meta: dict[str, Any]) -> dict[str, Any]:
    """``bench_decode.{json,md,png}`` under ``out_dir`` (written atomically); the plot compares tokens/s."""
    import json
    from pathlib import Path

    from ._io import atomic_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"bench_decode.{k}" for k in ("json", "md", "png")}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with atomic_file(paths["md"]) as tmp:
        tmp.write_text("\n".join(decode_report_lines(rows, meta)) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} | {r['pattern']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["dense_tokens_per_s"] for r in rows], height=0.4, label="dense", color="#999999")
    ax.barh([i - 0.2 for i in y], [r["sparse_tokens_per_s"] for r in rows], height=0.4, label="sparse", color="#4c72b0")
    ax.set_yticks(list(y), labels)
    ax.set_xlabel("greedy decode tokens/s, batch 1 (median)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(paths["png"]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths
