"""CUDA: dense float16 linears against PyTorch's semi-structured 2:4 sparse ones (cuSPARSELt/CUTLASS).

Times ``nmsparse.runtime.to_semi_structured`` on the layer shapes of the CPU bench (ViT-B, MiniLM,
4096x4096, 4096x11008) at several token counts, and the MiniLM encoder end to end (every linear of
the encoder 2:4, magnitude), with CUDA events: warm-up, then the median of ``--repeats`` timed calls
of each, dense and sparse interleaved. Writes JSON and a Markdown table. Needs a CUDA GPU.

    python benchmarks/semi_structured_cuda.py --out benchmarks/results/semi_structured_cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from nmsparse.mask import compute_mask
from nmsparse.pattern import parse_pattern
from nmsparse.runtime import to_semi_structured

SHAPES = [("vit-b qkv", 768, 2304), ("vit-b mlp fc1", 768, 3072), ("vit-b mlp fc2", 3072, 768),
          ("minilm ffn", 384, 1536), ("linear 4096", 4096, 4096), ("linear 4096->11008", 4096, 11008)]


def _time(fns: list, repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        order = list(enumerate(fns)) if i % 2 == 0 else list(enumerate(fns))[::-1]
        for slot, fn in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[slot].append(start.elapsed_time(end))
    return [statistics.median(t) for t in times]


@torch.no_grad()
def layer_rows(tokens: list[int], repeats: int) -> list[dict]:
    rows = []
    pattern = parse_pattern("2:4")
    for name, cin, cout in SHAPES:
        dense = nn.Linear(cin, cout).half().cuda().eval()
        dense.weight.mul_(compute_mask(dense.weight, pattern, absolute=True))
        sparse = copy.deepcopy(nn.Sequential(dense))
        assert to_semi_structured(sparse) == ["0"]
        for t in tokens:
            x = torch.randn(t, cin, dtype=torch.half, device="cuda")
            err = float((sparse(x) - dense(x)).abs().max() / dense(x).abs().max())
            d, s = _time([lambda d=dense, x=x: d(x), lambda s=sparse, x=x: s(x)], repeats)
            rows.append({"case": f"{name} {cin}->{cout}", "tokens": t, "dense_ms": d, "sparse_ms": s,
                         "speedup": d / s, "max_rel_error": err})
            print(f"{name} {cin}->{cout} tokens {t}: dense {d:.4f} ms, 2:4 {s:.4f} ms, {d / s:.2f}x", flush=True)
    return rows


@torch.no_grad()
def minilm_rows(batches: list[int], seq: int, repeats: int) -> list[dict]:
    from transformers import BertConfig, BertModel

    # the MiniLM-L6 architecture (random weights: speed does not depend on their values)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    dense = BertModel(config).half().cuda().eval()
    pattern = parse_pattern("2:4")
    for module in dense.encoder.modules():
        if isinstance(module, nn.Linear):
            module.weight.mul_(compute_mask(module.weight, pattern, absolute=True))
    sparse = copy.deepcopy(dense)
    converted = to_semi_structured(sparse.encoder)
    rows = []
    for b in batches:
        ids = torch.randint(1000, 20000, (b, seq), device="cuda")
        d, s = _time([lambda ids=ids: dense(input_ids=ids), lambda ids=ids: sparse(input_ids=ids)], repeats)
        rows.append({"case": f"minilm encoder ({len(converted)} linears 2:4)", "tokens": b * seq, "dense_ms": d,
                     "sparse_ms": s, "speedup": d / s})
        print(f"minilm batch {b} x {seq}: dense {d:.3f} ms, 2:4 {s:.3f} ms, {d / s:.2f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64,512,4096,16384", help="rows of the layer inputs")
    parser.add_argument("--batches", default="8,64,256", help="MiniLM batch sizes (sequence length 128)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/semi_structured_cuda")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (semi-structured 2:4 runs on cuSPARSELt/CUTLASS)", file=sys.stderr)
        return 2
    rows = layer_rows([int(t) for t in args.tokens.split(",")], args.repeats)
    rows += minilm_rows([int(b) for b in args.batches.split(",")], 128, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "float16",
            "timing": "CUDA events, median, dense and sparse interleaved"}
    (out / "semi_structured_cuda.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"{meta['device']}, torch {meta['torch']}, float16; {meta['timing']}", "",
             "| case | tokens | dense ms | 2:4 semi-structured ms | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['tokens']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | {r['speedup']:.2f}x |"
              for r in rows]
    (out / "semi_structured_cuda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
