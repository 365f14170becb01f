"""Quantized batch-1 products on a 4096x4096 layer against this machine's measured memory bandwidth.

    python benchmarks/quant_layers.py --out benchmarks/results/quant_layers

Each layout (2:4 and 1x16 at 75% sparsity, and dense; float32, int8 and int4 values, groups of 64,
int8 activations where the layout takes them) is called at batch 1 on the machine's threads,
cycling through enough copies to exceed twice the last-level cache (so the weights come from memory,
as in a model), 20 rounds, interleaved; the fastest round gives bytes read per second. Each round first
reads a 512 MB tensor (``torch.sum``, fastest of 3): a case's share of bandwidth is the best over the
rounds of its speed against that round's bandwidth (the machine's bandwidth drifts between rounds). Writes
``<out>.json`` and ``<out>.md``; the header names the CPU and the kernels' instruction set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nmsparse.bench import machine_meta
from nmsparse.runtime import _native
from nmsparse.runtime.formats import pack_block, pack_nm
from nmsparse.runtime.modules import QuantLinear
from nmsparse.runtime.quant import WeightScheme, quantize
from nmsparse.runtime.timing import last_level_cache_bytes


def _nm24(rows: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, size // 4, 4, generator=g)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, -1).indices, True)
    return (w * keep).reshape(rows, size)


def _block16(rows: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, size, generator=g)
    for r in range(rows // 16):
        w[r * 16:(r + 1) * 16, torch.randperm(size, generator=g)[size // 4:]] = 0
    return w


def _bandwidth_gbs(big: torch.Tensor, reads: int = 3) -> float:
    """GB/s of the fastest of ``reads`` full reads (``torch.sum``) of ``big``."""
    return big.numel() * 4 / min(_timed(big.sum) for _ in range(reads)) / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--shape", help="ROWSxCOLUMNS instead of --size squared (e.g. 5632x2048, a 1.1 B Llama's "
                        "gate projection)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/quant_layers")
    args = parser.parse_args()
    _native.require()
    threads = torch.get_num_threads()
    outputs, size = map(int, args.shape.split("x")) if args.shape else (args.size, args.size)
    x = torch.randn(size)
    y = torch.empty(outputs)
    cases = []
    for name, make, pack in (("2:4", _nm24, lambda w: pack_nm(w, 2, 4)), ("1x16:0.25", _block16, lambda w: pack_block(w, 16)),
                             ("dense", lambda r, s, seed: torch.randn(r, s), lambda w: w)):
        for bits in (8, 4):
            first = QuantLinear(quantize(pack(make(outputs, size, 0)), WeightScheme(bits, 64)), None)
            copies = max(2, -(-2 * last_level_cache_bytes() // first.weight_nbytes))
            mods = [first] + [QuantLinear(quantize(pack(make(outputs, size, i)), WeightScheme(bits, 64)), None)
                              for i in range(1, copies)]
            calls = [_native.gemv_call(m._arrays()) for m in mods]
            cases.append({"layout": name, "weights": f"int{bits}", "bytes": first.weight_nbytes,
                          "activations": "int8" if first.act_block else "fp32", "calls": calls, "mods": mods,
                          "times": []})
    # each round reads the bandwidth again: on a shared machine it moves by 2x within minutes, so a case's
    # share is its GB/s against the bandwidth of the same round (the best round's share is reported)
    big = torch.ones(128 * 1024 * 1024)
    big.sum()
    bandwidths = []
    for _ in range(args.rounds):
        bandwidths.append(_bandwidth_gbs(big))
        for case in cases:
            calls = case["calls"]
            t = _timed(lambda calls=calls: [c(x.data_ptr(), y.data_ptr(), threads) for c in calls]) / len(calls)
            case["times"].append(t)
    bandwidth = max(bandwidths)
    rows = []
    for case in cases:
        best = min(case["times"])
        gbs = case["bytes"] / best / 1e9
        share = max(case["bytes"] / t / 1e9 / b for t, b in zip(case["times"], bandwidths))
        rows.append({"layout": case["layout"], "weights": case["weights"], "activations": case["activations"],
                     "bytes_per_weight": round(case["bytes"] / (outputs * size), 4), "ms": round(1e3 * best, 4),
                     "gb_per_s": round(gbs, 1), "share_of_bandwidth": round(share, 3)})
    meta = machine_meta(threads, f"{outputs}x{size} at batch 1, weights from memory; bandwidth = torch.sum of 512 MB")
    meta["bandwidth_gb_per_s"] = round(bandwidth, 1)
    meta["bandwidth_range_gb_per_s"] = [round(min(bandwidths), 1), round(max(bandwidths), 1)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"kernels {meta['isa']} ({meta['cpu']}), threads {threads}; measured read bandwidth "
             f"{meta['bandwidth_range_gb_per_s'][0]}-{meta['bandwidth_gb_per_s']} GB/s across the rounds; share: "
             "against the same round's", "", "| layout | weights | activations | bytes/weight | ms | GB/s "
             "| share of bandwidth |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['weights']} | {r['activations']} | {r['bytes_per_weight']} | {r['ms']} | "
              f"{r['gb_per_s']} | {100 * r['share_of_bandwidth']:.0f}% |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
