"""``nmsparse env``: versions and which backends are available."""

from __future__ import annotations

import argparse
from typing import Any


def environment_with_kernels() -> dict[str, Any]:
    """:func:`nmsparse.env.environment` plus the sparse runtime's and the mask kernels' status (builds them once)."""
    from .. import _topk_cpu
    from ..env import environment as base
    from ..runtime import _native

    env = base()
    # 1xN and n:m kernels: C++ built for this CPU's ISA (avx512, avx2, neon, generic), or none
    env["backends"] = {"cpu_dense_with_zeros": True, "cpu_sparse_runtime": _native.status(),
                       "mask_kernels": _topk_cpu.status(),
                       **{k: v for k, v in env["backends"].items() if k != "cpu_dense_with_zeros"}}
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    env = environment_with_kernels()
    if args.json:
        from .display import print_json

        print_json(env)
        return 0
    print(f"nmsparse {env['nmsparse']}  python {env['python']}  {env['platform']}")
    for name, ver in env["packages"].items():
        print(f"  {name:<13} {ver or 'not installed'}")
    print(f"  cpu threads   {env['cpu_threads']}")
    for name, ok in env["backends"].items():
        if isinstance(ok, dict):  # the sparse runtime: which ISA path runs, or why none does
            text = (f"C++ kernels, {ok['isa']} path ({ok['vector_floats']} floats per vector)" if ok["backend"]
                    else f"none (layers stay dense): {ok['reason']}")
        else:
            text = ok if isinstance(ok, str) else ("available" if ok else "not available")
        print(f"  backend {name:<22} {text}")
    return 0
