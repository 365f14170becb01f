"""A/B of two builds of the kernel source on batch-1 quantized products, alternated in one process.

    python benchmarks/build_ab.py FAR_HINT=_MM_HINT_T0 default
    BITS=8 DENSE=1 SHAPES=49152x2048 python benchmarks/build_ab.py FAR_HINT=_MM_HINT_T0 default

Each argument is a build: ``default`` (the source as it is), ``rev:REV`` (the kernel sources of git revision
REV, e.g. ``rev:HEAD`` against the uncommitted ``default``; the plans' layout must be the same in both) or
comma-separated ``NAME=VALUE`` macros passed as ``-D`` flags (e.g. ``FAR_HINT=_MM_HINT_T0``, the far
prefetches' former L1 hint). The same
bound plans (``nms_gemv``) run through each build's library; the builds alternate every round, so the
machine's bandwidth drift falls on all alike. Weights: 2:4 (or dense with ``DENSE=1``, or 1x16 blocks at 25%
density with ``BLOCK16=1``), ``BITS`` 4 or
8, groups of ``G`` (64), over enough copies (~80 MB) to read from memory (``WARM=1``: one copy, its weights in
the cache: the kernel's own ceiling). Shapes: ``SHAPES`` (default
the 1.1 B Llama's q/o, gate/up and down). ``VARIANT``: the -march build (``native``, ``avx2``, ...).
Prints the median time per call and GB/s of each build. docs/benchmarks.md, session 8, has the figures.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from quant_layers import _block16, _nm24  # the same random layouts as the layer benchmark (same folder)

from nmsparse._cxx import build_cached
from nmsparse.runtime import _native
from nmsparse.runtime.formats import pack_block, pack_nm
from nmsparse.runtime.modules import QuantLinear
from nmsparse.runtime.quant import WeightScheme, quantize


def _layout(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    if kind == "dense":
        return torch.randn(rows, cols)
    if kind == "2:4":
        return pack_nm(_nm24(rows, cols, seed), 2, 4)
    return pack_block(_block16(rows, cols, seed), 16)


def _source_at(rev: str) -> Path:
    """The kernel sources (kernels.cpp and its headers) of git revision ``rev`` in a temporary folder."""
    here = _native._SOURCE.parent
    top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, check=True, capture_output=True,
                              text=True).stdout.strip())
    rel = here.relative_to(top).as_posix()
    folder = Path(tempfile.mkdtemp(prefix="nms_ab_"))
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{rel}"], cwd=top, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "show", f"{rev}:{rel}/{name}"], cwd=top, check=True, capture_output=True,
                              text=True).stdout
        (folder / name).write_text(text)
    return folder / _native._SOURCE.name


def main() -> None:
    builds = sys.argv[1:] or ["FAR_HINT=_MM_HINT_T0", "default"]
    variant = os.environ.get("VARIANT", "native")
    libs = {}
    for b in builds:
        rev = b.startswith("rev:")
        defines = [] if b == "default" or rev else [f"-D{d}" for d in b.split(",")]
        source = _source_at(b[4:]) if rev else _native._SOURCE
        lib, why = build_cached(source, "ab_" + "".join(ch if ch.isalnum() else "_" for ch in b) + "_" + variant,
                                _native._FLAGS + _native.VARIANTS[variant] + defines, "A/B build")
        if lib is None:
            raise SystemExit(f"build {b} failed: {why}")
        lib.nms_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int]
        libs[b] = lib
    bits, group, dense = int(os.environ.get("BITS", 4)), int(os.environ.get("G", 64)), bool(os.environ.get("DENSE"))
    block = bool(os.environ.get("BLOCK16"))
    kind = "dense" if dense else "1x16:0.25" if block else "2:4"
    spec = os.environ.get("SHAPES", "2048x2048,5632x2048,2048x5632")
    shapes = [tuple(map(int, s.split("x"))) for s in spec.split(",")]
    threads = torch.get_num_threads()
    for rows, cols in shapes:
        copies = 1 if os.environ.get("WARM") else int(80e6 // (rows * cols * 0.4)) + 1
        mods = [QuantLinear(quantize(_layout(kind, rows, cols, i), WeightScheme(bits, group)), None)
                for i in range(copies)]
        plans = [_native.gemv_plan(m._arrays()) for m in mods]
        x, y = torch.randn(cols), torch.empty(rows)
        times: dict[str, list[float]] = {b: [] for b in builds}
        for rnd in range(24):
            for b in builds if rnd % 2 == 0 else builds[::-1]:
                fn = libs[b].nms_gemv
                t0 = time.perf_counter()
                for p in plans:
                    fn(ctypes.addressof(p), x.data_ptr(), y.data_ptr(), threads)
                times[b].append((time.perf_counter() - t0) / len(plans))
        nbytes = mods[0].weight_nbytes
        cells = [f"{b}: {statistics.median(t[4:]) * 1e6:.1f} us ({nbytes / statistics.median(t[4:]) / 1e9:.1f} GB/s)"
                 for b, t in times.items()]
        print(f"{rows}x{cols} {kind} int{bits}:", "  ".join(cells))


if __name__ == "__main__":
    main()
