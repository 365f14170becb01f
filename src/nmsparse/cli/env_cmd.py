"""``nmsparse env``: versions and which backends are available."""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata
from typing import Any


def _sparse_runtime() -> dict[str, object]:
    from ..runtime import _native

    return _native.status()


def environment() -> dict[str, Any]:
    """Versions of the stack and the availability of each backend (never initialises CUDA needlessly)."""
    import torch

    from ..version import __version__

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    cusparselt = False
    if cuda:
        try:
            cusparselt = bool(torch.backends.cusparselt.is_available())
        except AttributeError:
            cusparselt = False
    packages = ["torch", "torchvision", "timm", "transformers", "safetensors", "numba", "numpy"]
    return {
        "nmsparse": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: version(name) for name in packages},
        "cpu_threads": torch.get_num_threads(),
        "backends": {
            "cpu_dense_with_zeros": True,
            # 1xN and n:m kernels: C++ built for this CPU's ISA (avx512, avx2, neon, generic), or none
            "cpu_sparse_runtime": _sparse_runtime(),
            "cuda": cuda,
            "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
            "cusparselt": cusparselt,
            "semi_structured_2_4": cuda,
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
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
