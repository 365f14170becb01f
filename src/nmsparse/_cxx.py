"""Build a C++ source into a shared library once per machine and load it with ctypes.

Used by the sparse runtime's kernels (:mod:`nmsparse.runtime._native`) and the mask kernels
(:mod:`nmsparse._topk_cpu`). A library is cached under ``~/.cache/nmsparse/kernels``
(``NMSPARSE_CACHE`` overrides), keyed by the source, the compiler's version, the flags and this CPU,
and written atomically (a concurrent process sees the old file or the whole new one). Works offline;
needs a C++ compiler (``CXX``, g++, c++ or clang++).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .env import cache_root, cpuinfo_line

__all__ = ["BASE_FLAGS", "cache_dir", "compiler", "cpu_signature", "build", "build_cached"]

BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
_LOCK = threading.Lock()


def cache_dir() -> Path:
    return cache_root() / "kernels"


def cpu_signature() -> str:
    """This CPU's feature line (``flags`` on x86, ``Features`` on ARM) or, failing that, its name."""
    return cpuinfo_line("flags", "Features") or platform.processor() or platform.machine()


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(cxx: str, source: Path, out: Path, flags: list[str], what: str) -> None:
    """Compile ``source`` with ``flags`` into ``out`` (atomically). Raises OSError with the first error line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise OSError(f"{Path(cxx).name} failed to build the {what}: {first}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_cached(source: Path, stem: str, flags: list[str], what: str) -> tuple[ctypes.CDLL | None, str]:
    """``(library, "")`` built for this machine (or found in the cache), or ``(None, reason)``."""
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler (g++/c++/clang++) on PATH; install one (e.g. apt-get install g++) or set CXX"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run {cxx}: {exc}"
    # the headers beside the source are part of it (kernels.cpp includes qkernels.h)
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256("\n".join([source.read_text(), *headers, version, " ".join(flags), cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"{stem}_{key}.so"
    with _LOCK:
        try:
            if not path.exists():
                build(cxx, source, path, flags, what)
            return ctypes.CDLL(str(path)), ""
        except (OSError, subprocess.SubprocessError) as exc:
            return None, str(exc).splitlines()[0]
