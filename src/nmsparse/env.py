"""The software and hardware a run used: versions, threads, CPU ISA, CUDA (recorded in every run
directory). Cheap and side-effect free: it never builds a kernel or initialises CUDA needlessly;
``nmsparse env`` adds the sparse runtime's status on top."""

from __future__ import annotations

import os
import platform
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["environment", "cpu_isa", "cpu_has_bf16", "PRECISIONS", "resolve_precision", "autocast", "cpuinfo_line",
           "cache_root"]


def cache_root() -> Path:
    """Where nmsparse caches what it builds or converts once per machine (kernels, GGUF conversions):
    ``$NMSPARSE_CACHE``, default ``~/.cache/nmsparse``."""
    return Path(os.environ.get("NMSPARSE_CACHE") or Path.home() / ".cache" / "nmsparse")


@cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""


def cpuinfo_line(*prefixes: str) -> str | None:
    """The first line of ``/proc/cpuinfo`` that starts with one of ``prefixes`` (``"flags"``,
    ``"model name"``...), or None (no such line, or no /proc/cpuinfo: not Linux)."""
    return next((line for line in _cpuinfo().splitlines() if line.startswith(prefixes)), None)


def cpu_isa() -> str:
    """The widest SIMD family this CPU reports: avx512, avx2, neon, or generic (from /proc/cpuinfo)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "neon"
    flags = (cpuinfo_line("flags") or "") + " "
    if " avx512f" in flags:
        return "avx512"
    if " avx2" in flags and " fma" in flags:
        return "avx2"
    return "generic"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``
    in /proc/cpuinfo): where it does not, PyTorch emulates bfloat16 products and they run slower than
    float32 ones."""
    flags = " " + (cpuinfo_line("flags", "Features") or "") + " "
    return any(f" {flag} " in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: the matmul precision ``precision`` means for a training run (a recovery) on
    ``device``. ``auto`` is ``bf16`` where the device multiplies bfloat16 natively (a CPU with AVX512-BF16,
    AMX or Arm BF16; a CUDA GPU that supports it) and ``fp32`` elsewhere, where emulated bfloat16 would be
    slower than float32.

    Raises:
        ValueError: a precision other than ``auto``, ``fp32``, ``bf16``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The context a step of ``precision`` (``fp32``, ``bf16``, or ``auto``: :func:`resolve_precision`) runs
    its products in: bfloat16 autocast (mixed precision: parameters and optimizer state stay float32), or a
    disabled one."""
    import torch

    enabled = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def environment() -> dict[str, Any]:
    """Versions of the stack, thread count, CPU ISA and CUDA availability."""
    import torch

    from .version import __version__

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
        "cpu_isa": cpu_isa(),
        "packages": {name: version(name) for name in packages},
        "cpu_threads": torch.get_num_threads(),
        "backends": {
            "cpu_dense_with_zeros": True,
            "cuda": cuda,
            "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
            "cusparselt": cusparselt,
            "semi_structured_2_4": cuda,
        },
    }
