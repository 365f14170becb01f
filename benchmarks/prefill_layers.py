"""The batched (prefill) products of quantized layers against dense float32 at 128 tokens.

    python benchmarks/prefill_layers.py [--tokens 128] [--rounds 5]

For the layer shapes of a 1.1 B Llama (TinyLlama-1.1B) and of SmolLM2-135M, 2:4 and dense weights in
int8 and int4 (groups of 64, int8 activations): the time of the layer's batched product as the
runtime runs it (``_native.q_gemm``: the W8A8 integer GEMM on AVX-512 VNNI + VBMI builds), of the path
it replaced (the weight dequantized to float32 per call, then the float32 kernel: MKL for dense), and of
``torch.nn.functional.linear`` on the float32 weight. Best of ``--rounds``; prints one row per layer.
docs/benchmarks.md records the results.
"""

from __future__ import annotations

import argparse
import time

import torch

from nmsparse.runtime import _native, ops
from nmsparse.runtime.formats import pack_nm
from nmsparse.runtime.modules import QuantLinear
from nmsparse.runtime.quant import WeightScheme, quantize, quantize_activations

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632), (576, 576), (1536, 576), (576, 1536)]


def _best(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _dequantized(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    arrays = mod._arrays()
    xa = quantize_activations(x, mod.act_block)
    vals = _native.q_dequant(arrays)
    if arrays.kind == 0:
        return ops._nm_linear(xa, arrays.index, vals, None, mod.out_features, arrays.n, arrays.m, False)
    return torch.nn.functional.linear(xa, vals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    _native.require()
    print(f"kernels {_native.status()['isa']}, {torch.get_num_threads()} threads, {args.tokens} tokens, best of "
          f"{args.rounds} (ms)")
    print("| layer | weights | integer GEMM | dequantize + float32 | dense float32 |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for out, cols in SHAPES:
        w = torch.randn(out, cols, generator=g)
        keep = torch.zeros(out, cols // 4, 4, dtype=torch.bool).scatter_(
            -1, w.view(out, -1, 4).abs().topk(2, -1).indices, True)
        x = torch.randn(args.tokens, cols, generator=g)
        dense = _best(lambda: torch.nn.functional.linear(x, w), args.rounds)
        for name, layout in (("2:4", pack_nm((w.view(out, -1, 4) * keep).view(out, cols), 2, 4)), ("dense", w)):
            for bits in (8, 4):
                mod = QuantLinear(quantize(layout, WeightScheme(bits, 64)), None)
                arrays = mod._arrays()
                gemm = _best(lambda: _native.q_gemm(x, arrays), args.rounds) \
                    if _native.q_gemm(x[:2], arrays) is not None else float("nan")
                before = _best(lambda: _dequantized(mod, x), args.rounds)
                print(f"| {out}x{cols} {name} | int{bits} | {gemm:.2f} | {before:.2f} | {dense:.2f} |")


if __name__ == "__main__":
    main()
