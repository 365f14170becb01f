"""Batch-1 quantized products with their weights on 4 KB pages against transparent huge pages.

    python benchmarks/huge_pages.py [--shape tinyllama|smollm2-head]

The 154 products of a 1.1 B Llama (TinyLlama-1.1B's layer shapes, 22 layers) at 2:4 int8 (groups of
64), or the LM head of SmolLM2 in dense int8, are built twice in one process: once with
``NMSPARSE_HUGE_PAGES=0`` (ordinary memory) and once placed on huge pages (the default). Both sets
are called in turn, 10 rounds, interleaved, so the machine's drift falls on both; prints the best and
median round of each in ms and GB/s of weights read. docs/benchmarks.md records the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nmsparse.runtime import _native
from nmsparse.runtime.formats import pack_nm
from nmsparse.runtime.modules import QuantLinear
from nmsparse.runtime.quant import WeightScheme, quantize

TINYLLAMA = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]


def _nm24(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols // 4, 4, generator=g)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, -1).indices, True)
    return (w * keep).reshape(rows, cols)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["tinyllama", "smollm2-head"], default="tinyllama")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    _native.require()
    if args.shape == "tinyllama":
        packs = [quantize(pack_nm(_nm24(o, i, 7 * layer + k), 2, 4), WeightScheme(8, 64))
                 for layer in range(22) for k, (o, i) in enumerate(TINYLLAMA)]
    else:
        packs = [quantize(torch.randn(49152, 576), WeightScheme(8, 64)) for _ in range(4)]
    sets = {}
    for name, flag in (("4 KB pages", "0"), ("huge pages", "1")):
        os.environ["NMSPARSE_HUGE_PAGES"] = flag
        mods = [QuantLinear(p, None) for p in packs]
        calls = [(_native.gemv_call(m._arrays()), torch.randn(m.in_features), torch.empty(m.out_features))
                 for m in mods]
        sets[name] = (calls, sum(m.weight_nbytes for m in mods), mods)
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {name: [] for name in sets}
    for _ in range(args.rounds):
        for name, (calls, _, _) in sets.items():
            t0 = time.perf_counter()
            for call, x, y in calls:
                call(x.data_ptr(), y.data_ptr(), threads)
            times[name].append(time.perf_counter() - t0)
    for name, (_, nbytes, _) in sets.items():
        best, median = min(times[name]), statistics.median(times[name])
        print(f"{args.shape} {name}: best {1e3 * best:.2f} ms ({nbytes / best / 1e9:.1f} GB/s), "
              f"median {1e3 * median:.2f} ms ({nbytes / median / 1e9:.1f} GB/s), {threads} threads")


if __name__ == "__main__":
    main()
