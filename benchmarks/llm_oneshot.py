"""One-shot N:M pruning of a real causal LM (SmolLM2-135M by default): perplexity of held-out text
against the dense model, for every method and pattern, with the same calibration data.

    python benchmarks/llm_oneshot.py --model gguf:smollm2 --samples 32 --seq-len 256 \
        --methods magnitude,wanda,sparsegpt --patterns 2:4,4:8 --out benchmarks/results/llm_oneshot

Held-out text: the built-in held-out topics (``text:heldout``, never calibration data), 4,096 tokens in
512-token windows. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from nmsparse.models import build_model
from nmsparse.oneshot import FidelityCheck, PruneConfig, prune
from nmsparse.oneshot.data import build_calibration, heldout_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gguf:smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib", default="text:builtin")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="2:4,4:8")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default="benchmarks/results/llm_oneshot")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, source = build_model(args.model)
    batches = build_calibration(args.calib, dense, source, args.samples, args.seq_len)
    heldout = heldout_data(dense, source, "causal_lm", max_tokens=args.tokens)
    check = FidelityCheck(dense, heldout)
    rows = [{"method": "dense", "pattern": "-", "perplexity": check.dense()["perplexity"], "ratio": 1.0, "prune_s": 0}]
    print(rows[0], flush=True)
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune(model, PruneConfig(pattern, method), calibration=batches if method != "magnitude" else None,
                  progress="none")
            seconds = time.perf_counter() - start
            result = check(model)
            rows.append({"method": method, "pattern": pattern, "perplexity": result["perplexity"],
                         "ratio": result["ratio_to_dense"], "prune_s": round(seconds, 1)})
            print(rows[-1], flush=True)
            del model
    meta = {"model": args.model, "calibration": f"{args.samples} x {args.seq_len} tokens of {args.calib}",
            "heldout": f"{check.dense()['tokens']} scored tokens of text:heldout, 512-token windows",
            "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"{meta['model']}; calibration {meta['calibration']}; held-out {meta['heldout']}; "
             f"{meta['threads']} threads", "", "| method | pattern | perplexity | x dense | prune s |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['pattern']} | {r['perplexity']:.2f} | {r['ratio']:.2f} | {r['prune_s']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
