"""The C++ kernels of the sparse runtime: built once per machine, loaded with ctypes.

Why a plain C++ shared library (``csrc/kernels.cpp``): batched sparse products need
register-blocked micro-kernels (a tile of accumulators kept in vector registers while each loaded
weight or input vector is reused across the tile), which numba cannot express (it spills such tiles
to memory: about 5 GFLOP/s per thread against 60+ for the C++ tile). One source serves every CPU:
it is written over GCC/Clang vector extensions and compiled with ``-march=native``, so the same
micro-kernels become AVX-512, AVX2 + FMA, NEON or SSE2 code (docs/runtime.md says why this and not
``at::vec`` or a SIMD library). Why ctypes and not ``torch.utils.cpp_extension``: the kernels touch
only raw float buffers, so they need no PyTorch headers; g++ builds the library in a few seconds
instead of most of a minute, and no ``ninja`` is needed.

The library is built by :func:`require` (called by ``convert``, ``load_compressed`` and the sparse
modules' constructors, never inside ``forward``), cached under ``~/.cache/nmsparse``
(``NMSPARSE_CACHE`` overrides) keyed by the source, compiler and CPU, written atomically, and works
offline. Without a working compiler :func:`require` raises :class:`KernelsUnavailable` with a
one-line reason and the fix, and ``convert`` leaves the layers dense. ``NMSPARSE_RUNTIME_BACKEND=dense``
turns the kernels off the same way.

The functions below take tensors and the integers of a layout; the PyTorch operators of
:mod:`nmsparse.runtime.ops` call them.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import threading
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .._cxx import build, build_cached, compiler, cpu_signature
from .formats import nm_chunk, offset_bits

__all__ = ["KernelsUnavailable", "available", "status", "require", "block_mm", "implicit_conv", "nm_mm", "im2col",
           "library", "runnable_variants", "VARIANTS", "gemv_call", "QArrays", "q_gemv", "q_gemm", "gemv_plan",
           "q_dequant", "huge_pages", "HUGE_PAGE"]

_SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
# -fno-math-errno: exp() in the decode step's SiLU and softmax vectorises (glibc's libmvec); errno is never read
_FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
# -march of each build: "native" runs here; the others build the same source for another instruction
# set (the tests compile each, and run those this CPU supports)
VARIANTS = {"native": ["-march=native"], "avx512": ["-march=skylake-avx512"],
            "avx512vnni": ["-march=skylake-avx512", "-mavx512vnni", "-mavx512vbmi"], "avx2": ["-march=haswell"],
            "generic": ["-march=x86-64"], "neon": ["-march=armv8-a"]}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@cache
def _load(variant: str) -> tuple[ctypes.CDLL | None, str]:
    """``(library, reason)``; the library is None with the reason it could not be built or loaded."""
    if os.environ.get("NMSPARSE_RUNTIME_BACKEND", "").lower() in ("dense", "none", "off"):
        return None, f"NMSPARSE_RUNTIME_BACKEND={os.environ['NMSPARSE_RUNTIME_BACKEND']}"
    if variant != "native" and (variant == "neon") != platform.machine().lower().startswith(("arm", "aarch")):
        return None, f"the {variant} build is for another architecture than {platform.machine()}"
    lib, reason = build_cached(_SOURCE, f"nmsparse_kernels_{variant}", _FLAGS + VARIANTS[variant], "runtime kernels")
    if lib is None:
        return None, reason
    lib.nms_isa.restype = ctypes.c_char_p
    lib.nms_vector_width.restype = ctypes.c_int
    lib.nms_block_mm.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR,
                                 ctypes.c_int, ctypes.c_int]
    lib.nms_nm_mm.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              _I64, _PTR, _I64, _PTR, ctypes.c_int, _PTR, ctypes.c_int]
    lib.nms_conv_offsets.argtypes = [_PTR, _I64, _I64, *([ctypes.c_int] * 6), _I64, _I64, ctypes.c_int, _PTR]
    lib.nms_im2col.argtypes = [_PTR, _I64, _I64, _I64, _I64, *([ctypes.c_int] * 9), _PTR, ctypes.c_int]
    lib.nms_gemv.argtypes = [_PTR, _PTR, _PTR, ctypes.c_int]
    lib.nms_transpose.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, ctypes.c_int]
    _INT = ctypes.c_int
    lib.nms_nmq_gemv.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT, _INT, _INT, _INT, _I64, _INT, _PTR,
                                 _PTR, _INT, _INT]
    lib.nms_blockq_gemv.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT, _I64, _PTR, _PTR, _INT, _INT]
    lib.nms_denseq_gemv.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _INT, _I64, _INT, _PTR, _PTR, _INT, _INT]
    lib.nms_nmq_dequant.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _INT, _I64, _PTR, _INT]
    lib.nms_q_gemm.argtypes = [_INT, _PTR, _PTR, _PTR, _I64, _I64, _INT, _INT, _I64, _INT, _INT, _I64, _PTR, _I64,
                               _PTR, _PTR, _INT, _INT]
    lib.nms_q_gemm.restype = _INT
    lib.nms_q_gemm_takes.argtypes = [_INT, _INT, _INT, _I64, _INT, _I64]
    lib.nms_q_gemm_takes.restype = _INT
    lib.nms_llama_step.argtypes = [_PTR, _I64, _I64, ctypes.c_float, ctypes.c_float, _PTR, _INT, _PTR]
    lib.nms_blockq_dequant.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _INT, _I64, _PTR, _INT]
    lib.nms_phase_planes.argtypes = [_PTR, _I64, _I64, _I64, _I64, *([ctypes.c_int] * 4), _I64, _I64, _I64, _PTR,
                                     ctypes.c_int]
    return lib, ""


def _variant() -> str:
    """The build the runtime runs: ``native``, or the one ``NMSPARSE_RUNTIME_ISA`` names (a key of
    :data:`VARIANTS` this CPU runs, e.g. ``avx2`` to measure the AVX2 path on an AVX-512 machine).

    Raises:
        KernelsUnavailable: the variable names no build this CPU can run.
    """
    name = os.environ.get("NMSPARSE_RUNTIME_ISA", "").strip().lower() or "native"
    if name not in runnable_variants():
        raise KernelsUnavailable(f"NMSPARSE_RUNTIME_ISA={name!r} is not a build this CPU runs; expected one of "
                                 f"{', '.join(runnable_variants())}")
    return name


def library(variant: str = "native") -> ctypes.CDLL | None:
    """The loaded kernel library (``"native"``: built for this CPU; or a key of :data:`VARIANTS`)."""
    return _load(variant)[0]


class KernelsUnavailable(RuntimeError):
    """The sparse CPU kernels cannot be built or loaded here (the message says why and what fixes it)."""


_LOADED: ctypes.CDLL | None = None


def require() -> ctypes.CDLL:
    """This machine's kernel library, built (once per machine, then cached on disk) and loaded now.

    Raises:
        KernelsUnavailable: no working compiler, a failed build, or kernels turned off.
    """
    global _LOADED
    if _LOADED is None:
        lib, reason = _load(_variant())
        if lib is None:
            raise KernelsUnavailable(f"sparse CPU kernels unavailable: {reason}")
        _LOADED = lib
    return _LOADED


def loaded() -> ctypes.CDLL:
    """The library :func:`require` loaded (loads it on a first call that came before any require)."""
    return _LOADED if _LOADED is not None else require()


def available() -> bool:
    return status()["backend"] is not None


def status() -> dict[str, object]:
    """What the runtime runs on here: ``{"backend": "cpp"|None, "isa": "avx512"|"avx2"|"neon"|"generic",
    "vector_floats": ..., "reason": ...}``; backend None means layers stay dense, for the reason given."""
    try:
        lib, reason = _load(_variant())
    except KernelsUnavailable as err:
        lib, reason = None, str(err)
    if lib is None:
        return {"backend": None, "isa": None, "vector_floats": None, "reason": reason}
    return {"backend": "cpp", "isa": lib.nms_isa().decode(), "vector_floats": lib.nms_vector_width(), "reason": ""}


def _cpu_flags() -> set[str]:
    return set(cpu_signature().split(":", 1)[-1].split())


def runnable_variants() -> list[str]:
    """The builds of :data:`VARIANTS` this CPU can run (always ``native``)."""
    flags, arm = _cpu_flags(), platform.machine().lower().startswith(("arm", "aarch"))
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
    need = {"avx512": avx512, "avx512vnni": avx512 | {"avx512_vnni", "avx512vbmi"}, "avx2": {"avx2", "fma"},
            "generic": set()}
    out = ["native"]
    if arm:
        return out + ["neon"]
    return out + [v for v, req in need.items() if req <= flags]


def compile_only(variant: str, out_dir: Path) -> Path:
    """Build the library for ``variant`` (any architecture the compiler targets) without loading it:
    the tests compile the instruction sets this CPU cannot run.

    Raises:
        KernelsUnavailable: no compiler; OSError: the build failed (its first line of errors)."""
    cxx = os.environ.get("NMSPARSE_CROSS_CXX") if variant == "neon" and not platform.machine().startswith(
        ("arm", "aarch")) else compiler()
    if not cxx:
        raise KernelsUnavailable(f"no compiler for the {variant} build")
    path = out_dir / f"nmsparse_kernels_{variant}.so"
    build(cxx, _SOURCE, path, _FLAGS + VARIANTS[variant], "runtime kernels")
    return path


class BlockArrays(NamedTuple):
    """A 1xN layout as tensors (see :class:`~nmsparse.runtime.formats.BlockPacked`)."""

    cols: torch.Tensor  # [R, K] int32
    kstart: torch.Tensor  # [R, chunks + 1] int32
    vals: torch.Tensor  # [R, K, B] float32


class NMArrays(NamedTuple):
    """An n:m layout as tensors and integers (see :class:`~nmsparse.runtime.formats.NMPacked`)."""

    codes: torch.Tensor  # flat uint8
    vals: torch.Tensor  # flat float32
    rows: int
    columns: int
    n: int
    m: int


def _opt(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _block_args(w: BlockArrays) -> tuple:
    rows, kept, block = w.vals.shape
    return w.cols.data_ptr(), w.kstart.data_ptr(), w.kstart.shape[1] - 1, w.vals.data_ptr(), rows, kept, block


def _nm_args(w: NMArrays) -> tuple:
    return (w.codes.data_ptr(), w.vals.data_ptr(), w.rows, w.columns // w.m * w.n, nm_chunk(w.columns, w.n, w.m),
            w.n, w.m, offset_bits(w.m))


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
        padded = torch.empty(rows, -(-batch // 16) * 16, dtype=torch.float32)
        if xt.stride(0) == 1 and xt.stride(1) >= rows:  # a transposed row-major [batch, rows]: C++ tiles
            lib.nms_transpose(xt.data_ptr(), batch, rows, xt.stride(1), padded.data_ptr(), padded.stride(0),
                              torch.get_num_threads())
            return padded[:, :batch]
        padded = padded[:, :batch]
        padded.copy_(xt)
        return padded
    if xt.shape[1] == 1 and xt.stride(0) != 1:
        return xt.contiguous()
    return xt


def block_mm(xt: torch.Tensor, w: BlockArrays, bias: torch.Tensor | None = None, relu: bool = False,
             lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``W @ xt`` (``[out, batch]``) for a 1xN layout W and ``xt[columns, batch]``; ``bias`` (contiguous
    float32 ``[out]``) is added and ``relu`` applied as the kernel stores the output."""
    lib = lib or loaded()
    args = _block_args(w)
    xt = _rows(xt, lib)
    batch = xt.shape[1]
    out = torch.empty(args[4] * args[6], batch, dtype=torch.float32)
    lib.nms_block_mm(xt.data_ptr(), xt.stride(0), *args, batch, out.data_ptr(), batch, _opt(bias), int(relu),
                     torch.get_num_threads())
    return out


def nm_mm(xt: torch.Tensor, w: NMArrays, bias: torch.Tensor | None = None, relu: bool = False,
          lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``W @ xt`` (``[out, batch]``) for an n:m layout W and ``xt[columns, batch]``; ``bias`` and
    ``relu`` as in :func:`block_mm`."""
    lib = lib or loaded()
    xt = _rows(xt, lib)
    batch = xt.shape[1]
    out = torch.empty(w.rows, batch, dtype=torch.float32)
    lib.nms_nm_mm(xt.data_ptr(), xt.stride(0), *_nm_args(w), batch, out.data_ptr(), batch, _opt(bias), int(relu), None,
                  torch.get_num_threads())
    return out


HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64 and most aarch64 Linux kernels
_ARENA_BYTES = 32 * HUGE_PAGE


class _Arena:
    """Weight memory on transparent huge pages: fresh private anonymous mappings of 64 MB (or one
    array's size, if larger), ``madvise(MADV_HUGEPAGE)`` before the first write, handed out in
    64-byte aligned pieces. A mapping is unmapped when no array placed in it is left (each array's
    base is its mapping)."""

    def __init__(self) -> None:
        self.region: mmap.mmap | None = None
        self.start = self.used = self.size = 0
        self.lock = threading.Lock()

    def _new(self, nbytes: int) -> None:
        size = -(-max(nbytes, _ARENA_BYTES) // HUGE_PAGE) * HUGE_PAGE
        region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
        buf = ctypes.c_char.from_buffer(region)
        start = (-ctypes.addressof(buf)) % HUGE_PAGE
        del buf  # the export would keep the mapping from ever closing
        with contextlib.suppress(OSError):  # refused (THP compiled out): ordinary pages
            region.madvise(mmap.MADV_HUGEPAGE, start, size)
        self.region, self.start, self.used, self.size = region, start, 0, size

    def place(self, array: np.ndarray) -> np.ndarray:
        with self.lock:
            if self.region is None or self.used + array.nbytes > self.size:
                self._new(array.nbytes)
            at = self.start + self.used
            self.used += -(-array.nbytes // 64) * 64
            region = self.region
        out = np.frombuffer(region, dtype=np.uint8, count=array.nbytes, offset=at).view(array.dtype)
        out = out.reshape(array.shape)
        out[...] = array
        return out


_ARENA = _Arena()


def huge_pages(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` in weight memory that Linux is asked to back with transparent huge pages,
    or ``array`` itself where that does not apply (no ``MADV_HUGEPAGE`` on this system, an empty
    array, ``NMSPARSE_HUGE_PAGES=0``).

    Why: a batch-1 product streams its weights once per token, and the CPU's prefetchers stop at
    every 4 KB page boundary; on 2 MB pages the stream runs faster (docs/benchmarks.md gives the
    measurement). The memory is mapped here rather than taken from ``malloc``, whose heap hands out
    pages that were already touched (those keep 4 KB pages whatever the advice), and small arrays
    share mappings so they get huge pages too. Where the system's THP setting is ``never`` the
    advice is ignored and nothing changes."""
    if array.nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get("NMSPARSE_HUGE_PAGES", "1") == "0":
        return array
    return _ARENA.place(np.ascontiguousarray(array))


# Packed weights below this size run their batch-1 product on one thread: waking the sleeping OpenMP
# worker costs a few microseconds, more than it saves on a product this small (the thresholds tried
# and their decode times: docs/benchmarks.md, decoding on the CPU).
def _serial_gemv_bytes(default: int = 64 * 1024) -> int:
    text = os.environ.get("NMSPARSE_SERIAL_GEMV_BYTES", "")
    if not text:
        return default
    try:
        return max(0, int(text))
    except ValueError:
        import warnings

        warnings.warn(f"NMSPARSE_SERIAL_GEMV_BYTES={text!r} is not a byte count (e.g. 65536); using {default}",
                      stacklevel=2)
        return default


SERIAL_GEMV_BYTES = _serial_gemv_bytes()


def gemv_call(w: BlockArrays | NMArrays | QArrays | torch.Tensor, bias: torch.Tensor | None = None,
              relu: bool = False, lib: ctypes.CDLL | None = None):
    """The batch-1 product ``out[rows] = W @ x`` (bias and ReLU as in :func:`block_mm`) as a function of
    the input's and output's addresses and the thread count, every other argument bound now in a
    plan the C++ side reads (``nms_gemv``): what a decode step runs per layer, where converting
    seventeen arguments took longer than a small product. The caller keeps ``w`` and ``bias`` alive
    and in place (``x`` holds ``columns`` floats, ``out`` rows). The function's ``plan`` attribute is
    the bound plan (the fused decode step reads it: ``runtime.decode``); any layout of
    :func:`gemv_plan` is taken."""
    lib = lib or loaded()
    plan = gemv_plan(w, bias, relu)
    fn, address = lib.nms_gemv, ctypes.addressof(plan)

    def call(x: int, out: int, threads: int) -> None:
        fn(address, x, out, threads)

    call.plan = plan  # kept alive with the function
    return call


class QArrays(NamedTuple):
    """A quantized layout as tensors and integers (see :class:`~nmsparse.runtime.quant.QPacked`).
    ``kind``: 0 n:m (``index`` = codes), 1 1xN (``index`` = cols, with ``kstart``), 2 dense (``index``
    and ``kstart`` unused)."""

    kind: int
    index: torch.Tensor
    kstart: torch.Tensor
    q: torch.Tensor  # uint8 bytes
    scales: torch.Tensor  # float16
    rows: int  # output features
    columns: int  # input features
    n: int
    m: int
    block: int
    bits: int
    group: int
    a8: bool = False  # activations quantized to int8 per block (quant.quantize_activations); n:m and dense


def _q_args(w: QArrays) -> tuple:
    """The arguments of the quantized batch-1 kernel of ``w`` after the input (see kernels.cpp nms_gemv)."""
    if w.kind == 0:
        return (w.index.data_ptr(), w.q.data_ptr(), w.scales.data_ptr(), w.rows, w.columns // w.m * w.n,
                nm_chunk(w.columns, w.n, w.m), w.n, w.m, offset_bits(w.m), w.bits, w.group, int(w.a8))
    if w.kind == 1:
        return (w.index.data_ptr(), w.q.data_ptr(), w.scales.data_ptr(), w.rows // w.block, w.index.shape[1], w.block,
                w.bits, w.group)
    return w.q.data_ptr(), w.scales.data_ptr(), w.rows, w.columns, w.bits, w.group, int(w.a8)


def gemv_plan(w: BlockArrays | NMArrays | QArrays | torch.Tensor, bias: torch.Tensor | None = None,
              relu: bool = False) -> ctypes.Array:
    """The plan ``nms_gemv`` reads for the batch-1 product of ``w`` (a float32 or quantized layout, or a
    dense contiguous float32 ``[rows, columns]`` weight): the kind and every argument but the input,
    the output and the thread count. The caller keeps ``w`` and ``bias`` alive and in place."""
    tail = (_opt(bias) or 0, int(relu))
    if isinstance(w, QArrays):
        args = (2 + w.kind, *_q_args(w), *tail)
    elif isinstance(w, BlockArrays):
        args = (1, *_block_args(w), *tail)
    elif isinstance(w, NMArrays):
        args = (0, *_nm_args(w), *tail)
    else:
        args = (5, w.data_ptr(), w.shape[0], w.shape[1], *tail)
    return (ctypes.c_int64 * len(args))(*args)


def q_gemv(x: torch.Tensor, w: QArrays, bias: torch.Tensor | None = None, relu: bool = False,
           threads: int | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``W @ x`` for one input row ``x[columns]`` (contiguous float32): ``[rows]``."""
    lib = lib or loaded()
    x = x.to(torch.float32).contiguous()
    out = torch.empty(w.rows, dtype=torch.float32)
    gemv_call(w, bias, relu, lib)(x.data_ptr(), out.data_ptr(), threads or torch.get_num_threads())
    return out


def q_gemm(x: torch.Tensor, w: QArrays, bias: torch.Tensor | None = None, relu: bool = False,
           threads: int | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """``x @ W^T`` for rows ``x[T, columns]`` with int8 activations (``w.a8``), integer products: the
    batched form of the batch-1 kernel, for n:m (m = 2n) and dense layouts. None where this build (no
    AVX-512 VNNI + VBMI) or the layout has no such product; the caller then dequantizes the weight."""
    if not w.a8 or w.kind == 1:
        return None
    lib = lib or loaded()
    jc = nm_chunk(w.columns, w.n, w.m) if w.kind == 0 else w.columns
    bits = offset_bits(w.m) if w.kind == 0 else 0
    if not lib.nms_q_gemm_takes(w.kind, w.n, w.m, jc, bits, w.group):
        return None
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], w.rows, dtype=torch.float32)
    lib.nms_q_gemm(w.kind, w.index.data_ptr() if w.kind == 0 else None, w.q.data_ptr(), w.scales.data_ptr(), w.rows,
                   w.columns, w.n, w.m, jc, bits, w.bits, w.group, x.data_ptr(), x.shape[0], out.data_ptr(),
                   _opt(bias), int(relu), threads or torch.get_num_threads())
    return out


def q_dequant(w: QArrays, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The float32 values of a quantized layout, in the float32 layout's order (n:m flat, 1xN ``[R, K, B]``,
    dense ``[rows, columns]``): what the batched products multiply with."""
    lib = lib or loaded()
    threads = torch.get_num_threads()
    if w.kind == 1:
        rows, kept = w.index.shape
        out = torch.empty(rows, kept, w.block, dtype=torch.float32)
        lib.nms_blockq_dequant(w.q.data_ptr(), w.scales.data_ptr(), rows, kept, w.block, w.bits, w.group,
                               out.data_ptr(), threads)
        return out
    if w.kind == 0:
        kept = w.columns // w.m * w.n
        out = torch.empty(w.rows * kept, dtype=torch.float32)
        lib.nms_nmq_dequant(w.q.data_ptr(), w.scales.data_ptr(), w.rows, kept, nm_chunk(w.columns, w.n, w.m), w.bits,
                            w.group, out.data_ptr(), threads)
        return out
    out = torch.empty(w.rows, w.columns, dtype=torch.float32)
    lib.nms_nmq_dequant(w.q.data_ptr(), w.scales.data_ptr(), w.rows, w.columns, w.columns, w.bits, w.group,
                        out.data_ptr(), threads)
    return out


def conv_offsets(cols: torch.Tensor | None, count: int, channels: int, kernel: tuple[int, int],
                 stride: tuple[int, int], dilation: tuple[int, int], plane: int, width: int, order: str,
                 lib: ctypes.CDLL) -> torch.Tensor | None:
    """Element offsets (int32) of the weight columns ``cols`` (None: columns ``0..count-1``) in the phase
    planes of :func:`implicit_conv` (``[sh, sw, C, plane]``, rows ``width`` wide); column order
    ``"chw"`` (``c * kh * kw + dy * kw + dx``) or ``"hwc"`` (``(dy * kw + dx) * C + c``). None where they
    overflow int32. Computed in C++ at every call (one pass over the kept columns)."""
    out = torch.empty(count, dtype=torch.int32)
    ok = lib.nms_conv_offsets(_opt(cols), count, channels, *kernel, *stride, *dilation, plane, width,
                              int(order == "hwc"), out.data_ptr())
    return out if ok else None


def implicit_conv(x: torch.Tensor, w: BlockArrays | NMArrays, kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int], order: str, bias: torch.Tensor | None = None,
                  relu: bool = False, lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
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
    lib = lib or loaded()
    n, c, h, wd = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    hp, wp = h + 2 * ph, wd + 2 * pw
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    hq, wq = -(-hp // sh), -(-wp // sw)  # phase plane rows and columns (bottom/right zero-extended)
    plane = n * hq * wq
    # channels lie cstride floats apart: an odd number of 64-byte lines, so that the inputs of
    # consecutive kept columns (other channels at the same spot) do not all fall into the same L1
    # sets, as they would for planes of a multiple of 4 KB (16x16x8 floats: 8 KB)
    cstride = -(-plane // 16) * 16
    cstride += 16 * (1 - (cstride // 16) % 2)
    block = isinstance(w, BlockArrays)
    offs = conv_offsets(w.cols if block else None, w.cols.numel() if block else w.columns, c, kernel, stride, dilation,
                        cstride, wq, order, lib)
    if offs is None:
        return None
    xin = x.to(torch.float32).contiguous()
    planes = torch.empty(sh * sw * c * cstride, dtype=torch.float32)
    lib.nms_phase_planes(xin.data_ptr(), n, c, h, wd, sh, sw, ph, pw, hq, wq, cstride, planes.data_ptr(),
                         torch.get_num_threads())
    # the last position computed is the last real output: every read stays inside the planes
    positions = ((n - 1) * hq + oh - 1) * wq + ow
    rows = w.vals.shape[0] * w.vals.shape[2] if block else w.rows
    out = torch.empty(rows, plane, dtype=torch.float32)
    if block:
        _, *layout = _block_args(w)  # the kept entries' offsets replace their column indices
        lib.nms_block_mm(planes.data_ptr(), 1, offs.data_ptr(), *layout, positions, out.data_ptr(), plane, _opt(bias),
                         int(relu), torch.get_num_threads())
    else:
        lib.nms_nm_mm(planes.data_ptr(), 1, *_nm_args(w), positions, out.data_ptr(), plane, _opt(bias), int(relu),
                      offs.data_ptr(), torch.get_num_threads())
    return out.view(rows, n, hq, wq)[:, :, :oh, :ow]


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], order: str, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``[C*kh*kw, N*oh*ow]`` columns of ``x[N, C, H, W]`` (zero padding) in ``order`` ``"chw"`` (PyTorch's
    ``unfold`` row order) or ``"hwc"`` (kernel position major, channel minor)."""
    lib = lib or loaded()
    x = x.to(torch.float32).contiguous()
    n, c, h, w = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    out = torch.empty(c * kernel[0] * kernel[1], n * oh * ow, dtype=torch.float32)
    lib.nms_im2col(x.data_ptr(), n, c, h, w, *kernel, *stride, *padding, *dilation, int(order == "hwc"),
                   out.data_ptr(), torch.get_num_threads())
    return out


def arrays_of(packed) -> BlockArrays | NMArrays:
    """The tensors of a :class:`~nmsparse.runtime.formats.BlockPacked` / ``NMPacked`` layout (shared memory)."""
    if hasattr(packed, "cols"):
        return BlockArrays(
            torch.from_numpy(packed.cols), torch.from_numpy(packed.kstart), torch.from_numpy(packed.vals)
        )
    return NMArrays(torch.from_numpy(packed.codes), torch.from_numpy(packed.vals), packed.shape[0], packed.shape[1],
                    packed.n, packed.m)
