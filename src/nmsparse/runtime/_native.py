"""The C++ kernels of the sparse runtime: built at first use, loaded with ctypes.

Why a plain C++ shared library (``csrc/kernels.cpp``) and not numba alone: batched sparse products
need register-blocked micro-kernels (a tile of accumulators kept in vector registers while each
loaded weight or input vector is reused across the tile), and numba spills such tiles to memory
(measured about 5 GFLOP/s per thread against 60+ for the C++ tile, docs/runtime.md). Why ctypes and
not ``torch.utils.cpp_extension``: the kernels touch only raw float buffers, so they need no PyTorch
headers; without them g++ builds the library in a few seconds instead of most of a minute, and no
``ninja`` is needed. The library is compiled for the machine it runs on (``-march=native``), cached
under ``~/.cache/nmsparse`` (``NMSPARSE_CACHE`` overrides) keyed by the source, compiler and CPU, and
written atomically. Where no compiler works, the runtime falls back to the numba kernels and
:func:`status` says why. ``NMSPARSE_RUNTIME_BACKEND=numba`` forces the fallback.
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
from functools import cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["available", "status", "block_mm", "implicit_conv", "nm_mm", "im2col", "library"]

_SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
_FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
# -march of each build: "native" runs here; the others build the same source for another instruction
# set (the tests compile each, and run those this CPU supports)
VARIANTS = {"native": ["-march=native"], "avx512": ["-march=skylake-avx512"], "avx2": ["-march=haswell"],
            "generic": ["-march=x86-64"], "neon": ["-march=armv8-a"]}
_LOCK = threading.Lock()
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _cache_dir() -> Path:
    root = os.environ.get("NMSPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nmsparse")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, out: Path, extra: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *_FLAGS, *extra, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise OSError(f"{Path(compiler).name} failed to build the runtime kernels: {first}")
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def _load(variant: str) -> tuple[ctypes.CDLL | None, str]:
    """``(library, reason)``; the library is None with the reason it could not be built or loaded."""
    if os.environ.get("NMSPARSE_RUNTIME_BACKEND", "").lower() == "numba":
        return None, "NMSPARSE_RUNTIME_BACKEND=numba"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler (g++/c++/clang++) on PATH"
    extra = VARIANTS[variant]
    if variant != "native" and (variant == "neon") != platform.machine().lower().startswith(("arm", "aarch")):
        return None, f"the {variant} build is for another architecture than {platform.machine()}"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot run {compiler}: {exc}"
    key = hashlib.sha256("\n".join([_SOURCE.read_text(), version, " ".join(_FLAGS + extra), _cpu_signature(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"nmsparse_kernels_{variant}_{key}.so"
    with _LOCK:
        try:
            if not path.exists():
                _build(compiler, path, extra)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as exc:
            return None, str(exc).splitlines()[0]
    lib.nms_isa.restype = ctypes.c_char_p
    lib.nms_block_mm.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR,
                                 ctypes.c_int, ctypes.c_int]
    lib.nms_nm_mm.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              _I64, _PTR, _I64, _PTR, ctypes.c_int, _PTR, ctypes.c_int]
    lib.nms_conv_offsets.argtypes = [_PTR, _I64, _I64, *([ctypes.c_int] * 6), _I64, _I64, ctypes.c_int, _PTR]
    lib.nms_im2col.argtypes = [_PTR, _I64, _I64, _I64, _I64, *([ctypes.c_int] * 9), _PTR, ctypes.c_int]
    lib.nms_transpose.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, ctypes.c_int]
    lib.nms_phase_planes.argtypes = [_PTR, _I64, _I64, _I64, _I64, *([ctypes.c_int] * 4), _I64, _I64, _PTR,
                                     ctypes.c_int]
    return lib, ""


def library(variant: str = "native") -> ctypes.CDLL | None:
    """The loaded kernel library (``"native"``: built for this CPU; or a key of :data:`VARIANTS`)."""
    return _load(variant)[0]


def available() -> bool:
    return library() is not None


def status() -> dict[str, object]:
    """What the runtime runs on here: ``{"backend": "cpp"|"numba", "isa": ..., "reason": ...}``."""
    lib, reason = _load("native")
    if lib is None:
        return {"backend": "numba", "isa": None, "reason": reason}
    return {"backend": "cpp", "isa": lib.nms_isa().decode(), "reason": ""}


def _ptr(a: np.ndarray | torch.Tensor) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.ctypes.data


def _rows(xt: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """``xt`` with a unit stride along the batch (any row stride), float32. A copy (the transposed
    input of a linear layer) gets rows padded to 16 floats, so the kernels' vector loads do not
    straddle cache lines (197 tokens: 788-byte rows; measured 18% on ViT-S's 2:4 linears), and a
    transposed row-major input is transposed by the C++ tiles (PyTorch's strided copy: ~4 GB/s)."""
    xt = xt.to(torch.float32)
    if xt.stride(1) != 1 or xt.stride(0) < xt.shape[1]:
        rows, batch = xt.shape
        if batch == 1:
            return xt.contiguous()
        padded = torch.empty(rows, -(-batch // 16) * 16)
        if xt.stride(0) == 1 and xt.stride(1) >= rows:  # a transposed row-major [batch, rows]: C++ tiles
            lib.nms_transpose(xt.data_ptr(), batch, rows, xt.stride(1), padded.data_ptr(), padded.stride(0),
                              torch.get_num_threads())
            return padded[:, :batch]
        padded = padded[:, :batch]
        padded.copy_(xt)
        return padded
    return xt


def _bias_ptr(bias: torch.Tensor | None) -> int | None:
    return None if bias is None else bias.data_ptr()


def _layout_args(packed) -> tuple:
    """The kernel arguments a packed layout fixes (pointers, sizes), built once per layout: a batch-1
    call is short enough that recomputing them showed in its time. Rebuilt if the arrays are replaced."""
    arrays = (packed.vals, getattr(packed, "codes", None), getattr(packed, "cols", None))
    cached = packed.__dict__.get("_native_args")
    if cached is None or any(a is not b for a, b in zip(cached[0], arrays)):
        if hasattr(packed, "codes"):  # n:m
            args: tuple = (_ptr(packed.codes), _ptr(packed.vals), packed.shape[0], packed.kept, packed.chunk,
                           packed.n, packed.m, packed.bits)
        else:
            rows, kept, block = packed.vals.shape
            args = (_ptr(packed.cols), _ptr(packed.kstart), packed.kstart.shape[1] - 1, _ptr(packed.vals), rows, kept,
                    block)
        cached = packed.__dict__["_native_args"] = (arrays, args)
    return cached[1]


def block_mm(xt: torch.Tensor, packed, variant: str = "native", bias: torch.Tensor | None = None,
             relu: bool = False) -> torch.Tensor:
    """``W @ xt`` for a :class:`~nmsparse.runtime.formats.BlockPacked` W and ``xt[columns, batch]``;
    ``bias`` (contiguous float32 ``[out]``) is added and ``relu`` applied as the kernel stores the output."""
    lib = library(variant)
    args = _layout_args(packed)
    xt = _rows(xt, lib)
    batch = xt.shape[1]
    if batch == 1 and xt.stride(0) != 1:
        xt = xt.contiguous()
    out = torch.empty(args[4] * args[6], batch)
    lib.nms_block_mm(xt.data_ptr(), xt.stride(0), *args, batch, out.data_ptr(), batch, _bias_ptr(bias), int(relu),
                     torch.get_num_threads())
    return out


def conv_offsets(cols: torch.Tensor | None, count: int, channels: int, kernel: tuple[int, int],
                 stride: tuple[int, int], dilation: tuple[int, int], plane: int, width: int, order: str,
                 lib: ctypes.CDLL) -> torch.Tensor | None:
    """Element offsets (int32) of the weight columns ``cols`` (None: columns ``0..count-1``) in the phase
    planes of :func:`implicit_conv` (``[sh, sw, C, plane]``, rows ``width`` wide); column order
    ``"chw"`` (``c * kh * kw + dy * kw + dx``) or ``"hwc"`` (``(dy * kw + dx) * C + c``). None where they
    overflow int32. Computed in C++ at every call (one pass over the kept columns)."""
    out = torch.empty(count, dtype=torch.int32)
    ok = lib.nms_conv_offsets(None if cols is None else cols.data_ptr(), count, channels, *kernel, *stride, *dilation,
                              plane, width, int(order == "hwc"), out.data_ptr())
    return out if ok else None


def implicit_conv(x: torch.Tensor, packed, kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int], order: str, cache: dict,
                  variant: str = "native", bias: torch.Tensor | None = None,
                  relu: bool = False) -> torch.Tensor | None:
    """Convolution of ``x[N, C, H, W]`` by a packed ``[out, C*kh*kw]`` weight (columns in ``order``)
    without im2col: ``[out, N, oh, ow]`` (a strided view), or None where the offsets would overflow int32.

    Implicit GEMM. The input is zero-padded once and cut into ``sh*sw`` phase planes (plane
    ``(py, px)`` holds padded rows ``py, py+sh, ...`` and columns ``px, px+sw, ...``; one plane for
    stride 1), laid out ``[sh, sw, C, N, Hq, Wq]``. Output pixel ``(n, oy, ox)`` is computed at flat
    position ``p = (n*Hq + oy)*Wq + ox``, and the input of weight column ``(c, dy, dx)`` for it sits
    at ``p + offset(c, dy, dx)`` in phase ``(dy*dh % sh, dx*dw % sw)``: every weight column is a
    contiguous run of one phase plane at a fixed offset, so the batched kernels run on the planes
    with ``ldx = 1`` and the offsets in place of column indices (1xN: per kept entry; n:m: a map
    from each column, applied as the chunk's columns are decoded). Positions past a row's last
    output (``ox >= ow``) are computed and dropped. The planes are the size of the input, 1/(kh*kw)
    of an im2col buffer, and the shifted runs of a channel share cache lines. ``bias`` and ``relu``
    as in :func:`block_mm`.
    """
    lib = library(variant)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    hq, wq = -(-hp // sh), -(-wp // sw)  # phase plane rows and columns (bottom/right zero-extended)
    plane = n * hq * wq
    block = hasattr(packed, "cols")
    cols = torch.from_numpy(packed.cols) if block else None
    offs = conv_offsets(cols, packed.cols.size if block else packed.shape[1], c, kernel, stride, dilation, plane, wq,
                        order, lib)
    if offs is None:
        return None
    xin = x.to(torch.float32).contiguous()
    planes = torch.empty(sh * sw * c * plane)
    lib.nms_phase_planes(_ptr(xin), n, c, h, w, sh, sw, ph, pw, hq, wq, _ptr(planes), torch.get_num_threads())
    # the last position computed is the last real output: every read stays inside the planes
    positions = ((n - 1) * hq + oh - 1) * wq + ow
    out = torch.empty(packed.shape[0], plane)
    if block:
        _, *layout = _layout_args(packed)  # the kept entries' offsets replace their column indices
        lib.nms_block_mm(planes.data_ptr(), 1, _ptr(offs), *layout, positions, out.data_ptr(), plane,
                         _bias_ptr(bias), int(relu), torch.get_num_threads())
    else:
        lib.nms_nm_mm(planes.data_ptr(), 1, *_layout_args(packed), positions, out.data_ptr(), plane, _bias_ptr(bias),
                      int(relu), _ptr(offs), torch.get_num_threads())
    return out.view(packed.shape[0], n, hq, wq)[:, :, :oh, :ow]


def nm_mm(xt: torch.Tensor, packed, variant: str = "native", bias: torch.Tensor | None = None,
          relu: bool = False) -> torch.Tensor:
    """``W @ xt`` for an :class:`~nmsparse.runtime.formats.NMPacked` W and ``xt[columns, batch]``;
    ``bias`` and ``relu`` as in :func:`block_mm`."""
    lib = library(variant)
    args = _layout_args(packed)
    xt = _rows(xt, lib)
    batch = xt.shape[1]
    out = torch.empty(args[2], batch)
    lib.nms_nm_mm(xt.data_ptr(), xt.stride(0), *args, batch, out.data_ptr(), batch, _bias_ptr(bias), int(relu), None,
                  torch.get_num_threads())
    return out


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], order: str, variant: str = "native") -> torch.Tensor:
    """``[C*kh*kw, N*oh*ow]`` columns of ``x[N, C, H, W]`` (zero padding) in ``order`` ``"chw"`` (PyTorch's
    ``unfold`` row order) or ``"hwc"`` (kernel position major, channel minor)."""
    lib = library(variant)
    x = x.to(torch.float32).contiguous()
    n, c, h, w = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = torch.empty(c * kernel[0] * kernel[1], n * oh * ow)
    lib.nms_im2col(_ptr(x), n, c, h, w, *kernel, *stride, *padding, *dilation, int(order == "hwc"), _ptr(out),
                   torch.get_num_threads())
    return out
