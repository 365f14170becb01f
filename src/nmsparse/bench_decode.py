"""Decoding benchmark of causal LMs on the CPU: greedy generation at batch 1 with the KV cache, the
dense float32 model and llama.cpp's GGUF types (measured in the same run) against the model pruned
(magnitude) and converted to the sparse runtime with float32, int8 or int4 weights.

For each row: time to first token (the prefill of the prompt), tokens per second of the decode that
follows, a decode step split into the pruned layers, the LM head and the rest, and whether the
converted model generates the tokens it must (float32: exactly those of the dense-with-zeros model).
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


def _decode_times(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int,
                  repeats: int) -> dict[str, tuple[float, float]]:
    """``{key: (ttft seconds, decode tokens/s)}`` (medians), the models timed interleaved in alternating
    order so that drift falls on all alike; decode = the full generation minus its first token (where
    a spike in the first-token timings of a tiny model makes that median not positive, the fastest
    generation minus the fastest first token: each is the least disturbed)."""
    first: dict[str, list[float]] = {k: [] for k in models}
    total: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    for key in keys:  # warm-up: kernels loaded, caches and tables allocated
        _generate(models[key], prompt, 2)
    for r in range(repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            first[key].append(_timed(lambda m=models[key]: _generate(m, prompt, 1)))
            total[key].append(_timed(lambda m=models[key]: _generate(m, prompt, new_tokens)))
    out = {}
    for key in keys:
        decode = statistics.median(a - f for a, f in zip(total[key], first[key]))
        if decode <= 0:
            decode = max(min(total[key]) - min(first[key]), 1e-9)
        out[key] = (statistics.median(first[key]), (new_tokens - 1) / decode)
    return out


def _kept_dense(conv_rows, pruned: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pruned layers the layer choice kept dense, by name with the block index as ``N``
    (``model.layers.N.self_attn.q_proj``): how many and the first one's reason."""
    import re

    kept: dict[str, dict[str, Any]] = {}
    for r in conv_rows:
        if r.fqn in pruned and not r.converted:
            entry = kept.setdefault(re.sub(r"\.\d+\.", ".N.", r.fqn), {"layers": 0, "reason": r.reason or ""})
            entry["layers"] += 1
    return kept


def _weights_mb(model: nn.Module) -> float:
    """Resident bytes of the model's parameters and buffers (shared storage counted once), in MB."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return round(total / 1e6, 1)


def run_decode_suite(models: list[str], patterns: list[str], prompt_tokens: int = 128, new_tokens: int = 128,
                     repeats: int = 3, choose: bool = True, progress: str = "auto",
                     weights: tuple[str, ...] = ("fp32", "int8", "int4"), llamacpp: str | None = None,
                     threads: int | None = None, group_size: int = 64) -> list[dict[str, Any]]:
    """One row per model x pattern x weights, plus the dense float32 model and llama.cpp's GGUF types.
    Quantized rows use scales per ``group_size`` values (``group_size`` in the row).

    A row: ``{model, pattern, weights, prompt_tokens, new_tokens, ttft_ms, tokens_per_s, speedup
    (decode tokens/s against the dense float32 model), vs_q8_0, vs_q4_0 (against llama.cpp, when
    measured: its decode speed right before and after this row, ``q8_0_adjacent`` / ``q4_0_adjacent``, see
    :class:`AdjacentAnchors`), same_tokens, converted_layers, sparse_layers, kept_dense (:func:`_kept_dense`),
    decode ("fused" or the module path), weights_mb, layers_ms, head_ms, attention_ms, rest_ms, python_ms,
    other_ms}``: a decode step by the fused step's clock (:meth:`~nmsparse.runtime.decode.LlamaDecoder.profile`;
    other: the last three).
    llama.cpp rows (``runtime: llama.cpp``, weights F32 / Q8_0 / Q4_0) come from ``llamacpp`` (the
    ``llamacpp.sh`` tool: GGUF of the same Hugging Face directory, llama-bench at the same threads, decode
    and prompt tokens/s), measured in this run; without it those rows are absent and ``note`` says why.

    With ``choose`` each layer is timed sparse vs its dense form (quantized like it) at the decode step's
    input and the faster is kept (:func:`nmsparse.runtime.convert`); the decoder's Linears are pruned by
    magnitude (attention and feed-forward), the LM head stays dense (quantized with the row's weights).
    ``same_tokens``: float32 rows generate exactly the tokens of the dense-with-zeros model; quantized
    rows carry ``top1_agreement`` with their own module path instead (see :func:`_token_check`).
    """
    from .models import build_model
    from .oneshot import PruneConfig, prune
    from .oneshot.data import heldout_text, load_tokenizer, token_ids
    from .runtime import convert
    from .select import Selection

    rows: list[dict[str, Any]] = []
    plan = [(m, p, w) for m in models for p in patterns for w in weights]
    bar = Progress(len(plan) + len(models), 0, progress, 1, True)
    done = 0
    for name in models:
        spec = decode_model_spec(name) or name
        dense, source = build_model(spec)
        hf_dir = source.hf_dir
        prompt = token_ids(load_tokenizer(hf_dir), heldout_text(), prompt_tokens).unsqueeze(0)
        base = {"model": name, "prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens}
        ttft, dense_tps = _decode_times({"dense": dense.eval()}, prompt, new_tokens, repeats)["dense"]
        rows.append({**base, "runtime": "PyTorch (HF modules)", "pattern": "dense", "weights": "fp32",
                     "ttft_ms": round(1e3 * ttft, 1), "tokens_per_s": round(dense_tps, 2), "speedup": 1.0,
                     "weights_mb": _weights_mb(dense), "decode": "module path"})
        anchors = llamacpp_rows(llamacpp, hf_dir, threads or torch.get_num_threads(), new_tokens, prompt_tokens)
        for row in anchors:
            rows.append({**base, **row})
        done += 1
        bar.update(done, f"{name} dense + llama.cpp")
        nearby = AdjacentAnchors(llamacpp, anchors, threads or torch.get_num_threads(), new_tokens)
        for pattern in patterns:
            pruned = copy.deepcopy(dense)
            result = prune(pruned, PruneConfig(pattern, "magnitude", Selection(layers=("ff", "attention"))),
                           progress="none")
            layer_patterns = {e["fqn"]: e["pattern"] for e in result.layers}
            reference = _generate(pruned, prompt, new_tokens)
            for w in weights:
                example = {"input_ids": prompt[:, :1]} if choose else None  # a decode step: one token
                sparse, conv_rows = convert(copy.deepcopy(pruned), layer_patterns, infer=False, example_inputs=example,
                                            repeats=6, weights=w, group_size=group_size)
                (ttft, tps), adjacent = nearby.around(
                    lambda m=sparse, p=prompt: _decode_times({"sparse": m}, p, new_tokens, repeats)["sparse"])
                row = {**base, "runtime": "nmsparse", "pattern": pattern, "weights": w,
                       "group_size": None if w == "fp32" else group_size, "ttft_ms": round(1e3 * ttft, 1),
                       "tokens_per_s": round(tps, 2), "speedup": round(tps / dense_tps, 3),
                       "converted_layers": sum(bool(r.converted) for r in conv_rows),
                       "kept_dense": _kept_dense(conv_rows, layer_patterns),
                       "sparse_layers": len(result.layers), "decode": conv_rows.decode or "module path",
                       "weights_mb": _weights_mb(sparse), "layer_choice": choose, **adjacent,
                       **nearby.ratios(tps, adjacent)}
                row.update(_step_breakdown(sparse, tps, [e["fqn"] for e in result.layers], prompt))
                row.update(_token_check(sparse, prompt, new_tokens, reference if w == "fp32" else None))
                rows.append(row)
                del sparse
                done += 1
                bar.update(done, f"{name} {pattern} {w}: {tps:.1f} tokens/s")
            del pruned
        del dense
    bar.close()
    return rows


def _step_breakdown(model: nn.Module, tokens_per_s: float, fqns: list[str], prompt: torch.Tensor) -> dict[str, float]:
    """``layers_ms``, ``head_ms``, ``other_ms`` of a decode step: the fused step's own clock over 32 greedy
    tokens (:meth:`~nmsparse.runtime.decode.LlamaDecoder.profile`: the products, the head, and
    ``attention_ms + rest_ms + python_ms`` as other), or, for a model that decodes through its modules,
    the pruned layers' time inside a generation (:func:`_layer_ms_per_token`; no head split)."""
    decoder = model.__dict__.get("_nms_decoder")
    if decoder is None:
        layers = _layer_ms_per_token(model, fqns, prompt, 32)
        return {"layers_ms": round(layers, 3), "other_ms": round(max(0.0, 1e3 / tokens_per_s - layers), 2)}
    parts = decoder.profile(model, prompt, 32)
    return {"layers_ms": round(parts["products"], 3), "head_ms": round(parts["head"], 3),
            "attention_ms": round(parts["attention"], 3), "rest_ms": round(parts["rest"], 3),
            "python_ms": round(parts["python"], 3),
            "other_ms": round(parts["attention"] + parts["rest"] + parts["python"], 2)}


def _token_check(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                 reference: torch.Tensor | None) -> dict[str, Any]:
    """Float32 rows (``reference`` given): whether the converted model generates exactly those tokens,
    and the first new token that differs. Quantized rows: ``top1_agreement``, the share of decode steps
    at which the fused step's top token equals the model's own module path's next token, fed the
    module path's tokens (teacher-forced: with int8 activations the two part at near-ties by float32
    summation order, and free generation would compound one parting into all later tokens)."""
    from .runtime.decode import DecodeCache, attach, detach

    if reference is not None:
        out = _generate(model, prompt, new_tokens)
        diff = (out[0, prompt.shape[1]:] != reference[0, prompt.shape[1]:]).nonzero()
        return {"same_tokens": bool(diff.numel() == 0), "first_difference": int(diff[0]) if diff.numel() else None}
    decoder = model.__dict__.get("_nms_decoder")
    if decoder is None:
        return {}
    detach(model)
    tokens = _generate(model, prompt, new_tokens)[0, prompt.shape[1]:]
    attach(model)
    decoder = model.__dict__["_nms_decoder"]
    cache = DecodeCache(decoder, prompt.shape[1] + new_tokens + 1)
    with torch.no_grad():
        logits = model(prompt, cache=cache).logits[0, -1]
        agree = int(logits.argmax()) == int(tokens[0])
        for i in range(1, len(tokens)):
            logits = decoder.step(int(tokens[i - 1]), cache)
            agree += int(logits.argmax()) == int(tokens[i])
    return {"top1_agreement": round(agree / len(tokens), 3)}


def find_llamacpp(option: str | None = None) -> tuple[str | None, str]:
    """The ``llamacpp.sh`` tool (``option``, else ``$NMSPARSE_LLAMACPP``, else ``llamacpp.sh`` on PATH), or
    None with the reason the llama.cpp columns are skipped."""
    import os
    import shutil

    path = option or os.environ.get("NMSPARSE_LLAMACPP") or shutil.which("llamacpp.sh")
    if not path:
        return None, ("llama.cpp columns skipped: no llamacpp.sh (give --llamacpp PATH, set NMSPARSE_LLAMACPP, "
                      "or put it on PATH)")
    if not os.path.isfile(path):
        return None, f"llama.cpp columns skipped: {path} does not exist"
    return path, ""


def llamacpp_rows(tool: str | None, hf_dir: str, threads: int, new_tokens: int,
                  prompt_tokens: int) -> list[dict[str, Any]]:
    """llama.cpp's decode and prompt tokens/s for the GGUF F32, Q8_0 and Q4_0 of ``hf_dir`` (same threads),
    through the ``llamacpp.sh`` tool; [] without one. A type that fails gets a row with its error."""
    import subprocess

    if tool is None:
        return []
    rows = []
    for kind in ("f32", "q8_0", "q4_0"):
        row: dict[str, Any] = {"runtime": "llama.cpp", "pattern": "dense", "weights": kind.upper(),
                               "decode": "llama-bench"}
        try:
            gguf = subprocess.run(["bash", tool, "gguf", hf_dir, kind], capture_output=True, text=True, check=True,
                                  timeout=3600).stdout.strip().splitlines()[-1]
            row["gguf"] = gguf
            for what, field, count in (("bench", "tokens_per_s", new_tokens), ("prefill", "prompt_tokens_per_s",
                                                                               prompt_tokens)):
                value, last = _llamacpp_run(tool, what, gguf, threads, count)
                if value is None:
                    row[f"{field}_error"] = last
                else:
                    row[field] = value
            import os

            row["weights_mb"] = round(os.path.getsize(gguf) / 1e6, 1)
        except (subprocess.SubprocessError, OSError, IndexError) as exc:
            row["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "prompt_tokens_per_s" in row:
            row["ttft_ms"] = round(1e3 * prompt_tokens / row["prompt_tokens_per_s"], 1)
        rows.append(row)
    return rows


def _llamacpp_run(tool: str, what: str, gguf: str, threads: int, count: int) -> tuple[float | None, str]:
    """``(tokens/s, the tool's last line)`` of one ``llamacpp.sh bench|prefill`` run; None when it failed."""
    import subprocess

    proc = subprocess.run(["bash", tool, what, gguf, str(threads), str(count)], capture_output=True, text=True,
                          timeout=3600)
    last = (proc.stdout.strip().splitlines() or ["="])[-1]
    try:
        return round(float(last.split("=", 1)[-1]), 2), last
    except ValueError:
        return None, last


class AdjacentAnchors:
    """llama.cpp's decode speed measured again right before and right after each nmsparse row, so that a
    ratio compares runs minutes apart at most seconds apart: a shared machine's memory bandwidth drifts
    (by 2x within one session on a cloud VM), and a ratio against an anchor taken at the start of a
    long run measures the drift as much as the runtimes. :meth:`around` runs ``measure`` between two
    llama-bench runs of each quantized type and returns its result with ``{q8_0_adjacent, q4_0_adjacent}``
    (tokens/s, mean of the two runs; a type without a GGUF or whose run failed is left out)."""

    def __init__(self, tool: str | None, anchors: list[dict[str, Any]], threads: int, new_tokens: int):
        self.tool, self.threads, self.new_tokens = tool, threads, new_tokens
        self.ggufs = {r["weights"]: r["gguf"] for r in anchors if r.get("gguf") and r.get("tokens_per_s")
                      and r["weights"] in ("Q8_0", "Q4_0")}
        self.first = {r["weights"]: r["tokens_per_s"] for r in anchors if r.get("tokens_per_s")}

    def ratios(self, tokens_per_s: float, adjacent: dict[str, float]) -> dict[str, float]:
        """``{vs_q8_0, vs_q4_0}``: against llama.cpp measured around the row (``adjacent``, from
        :meth:`around`) where it was, else against the run's first anchors."""
        out = {}
        for kind in ("Q8_0", "Q4_0"):
            anchor = adjacent.get(f"{kind.lower()}_adjacent", self.first.get(kind))
            if anchor:
                out[f"vs_{kind.lower()}"] = round(tokens_per_s / anchor, 3)
        return out

    def _speeds(self) -> dict[str, float | None]:
        return {k: _llamacpp_run(self.tool, "bench", g, self.threads, self.new_tokens)[0]
                for k, g in self.ggufs.items()} if self.tool else {}

    def around(self, measure):
        before = self._speeds()
        result = measure()
        after = self._speeds()
        adjacent = {f"{k.lower()}_adjacent": round((before[k] + after[k]) / 2, 2) for k in before
                    if before[k] is not None and after.get(k) is not None}
        return result, adjacent


def _vs(row: dict[str, Any], kind: str) -> str:
    """``1.21x`` or, against adjacent llama.cpp runs, ``1.21x (of 27.3)``: the anchor's tokens/s."""
    text = _fmt(row.get(f"vs_{kind}"), ".2f", "x")
    adjacent = row.get(f"{kind}_adjacent")
    return text if adjacent is None or text == "-" else f"{text} (of {adjacent:.1f})"


def _fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def decode_report_lines(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The Markdown table of a decoding run."""
    lines = [
        f"kernels {meta.get('isa')} ({meta.get('cpu', '')}), threads {meta['threads']}; {meta['note']}",
        "",
        "| model | runtime | pattern | weights | decode tokens/s | vs dense fp32 | vs Q8_0 | vs Q4_0 | TTFT ms "
        "| weights MB | step: layers / head / attention / rest / python ms | same tokens (fp32) / top-1 vs module "
        "path | layers sparse |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = "-"
        if r.get("layers_ms") is not None:
            step = (f"{r['layers_ms']:.1f} / {_fmt(r.get('head_ms'))} / {_fmt(r.get('attention_ms'))} / "
                    f"{_fmt(r.get('rest_ms'))} / {_fmt(r.get('python_ms'))}" if "rest_ms" in r
                    else f"{r['layers_ms']:.1f} / - / - / - / {r['other_ms']:.1f} (other)")
        same = "-" if "same_tokens" not in r else ("yes" if r["same_tokens"] else f"from token {r['first_difference']}")
        if "top1_agreement" in r:
            same = f"top-1 {100 * r['top1_agreement']:.0f}%"
        sparse = f"{r['converted_layers']}/{r['sparse_layers']}" if "sparse_layers" in r else "-"
        tps = _fmt(r.get("tokens_per_s")) if "error" not in r else f"error: {r['error']}"
        kind = r["weights"] + (f" (group {r['group_size']})" if r.get("group_size") not in (None, 64) else "")
        lines.append(f"| {r['model']} | {r['runtime']} | {r['pattern']} | {kind} | {tps} | "
                     f"{_fmt(r.get('speedup'), '.2f', 'x')} | {_vs(r, 'q8_0')} | {_vs(r, 'q4_0')} | "
                     f"{_fmt(r.get('ttft_ms'), '.0f')} | "
                     f"{_fmt(r.get('weights_mb'), '.0f')} | {step} | {same} | {sparse} |")
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

    labels = [f"{r['model'].split('/')[-1]} | {r['runtime']} {r['pattern']} {r['weights']}" for r in rows]
    colors = {"llama.cpp": "#dd8452", "nmsparse": "#4c72b0"}
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.4))
    ax.barh(range(len(rows)), [r.get("tokens_per_s") or 0 for r in rows],
            color=[colors.get(r["runtime"], "#999999") for r in rows])
    ax.set_yticks(list(range(len(rows))), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("greedy decode tokens/s, batch 1 (median); orange: llama.cpp, blue: nmsparse, grey: PyTorch dense")
    fig.tight_layout()
    with atomic_file(paths["png"]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths
