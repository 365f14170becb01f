"""CPU backend of :func:`nmsparse.mask.topk_groups`: fused, multithreaded mask kernels.

Mask computation runs after every optimizer step in SR-STE-style training and over every weight in
one-shot pruning, so it must cost far less than the step. The torch reference
(:func:`nmsparse.mask._topk_torch`) materialises several ``[G, m, m]`` temporaries; these kernels
read each group once and write its mask once. All follow the tie rule of :mod:`nmsparse.mask`, and
tests check they agree exactly with the torch path.

Two backends:

* **C++** (``csrc/masks.cpp``, built once per machine with ``-march=native`` and loaded with ctypes):
  the training path, m = 4 written as float32 0/1 into a parametrization's buffer, and SR-STE's
  in-place decay. Explicit vectors (AVX-512, AVX2, NEON or SSE from one source); loads in
  milliseconds, so a fresh process starts training without numba's ~1 s start-up. Measured on 11.2 M
  weights (AVX2): conv layout 8 ms, Linear layout 6 ms, against numba's 10 and 10 ms.
* **numba** (``_topk_numba``, imported on first use, cached on disk): any m, bool masks (one-shot
  pruning), and the float path where no compiler is present.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import numpy as np
import torch

from ._cxx import BASE_FLAGS, build_cached

__all__ = ["available", "cpp_library", "decay_grad", "decay_into", "status", "supports", "topk_rows", "topk_strided"]

_ONE_BITS = 0x3F800000  # the bits of float32 1.0: float masks are written through an int32 view


_MASKS_SOURCE = Path(__file__).with_name("csrc") / "masks.cpp"
# -march of each build of masks.cpp: "native" runs here; the tests build the others too
MASK_VARIANTS = {"native": ["-march=native"], "avx512": ["-march=skylake-avx512"], "avx2": ["-march=haswell"],
                 "generic": ["-march=x86-64"]}


@functools.cache
def cpp_library(variant: str = "native") -> ctypes.CDLL | None:
    """The C++ mask kernels built for this machine (or ``variant``), or None without a compiler or
    with ``NMSPARSE_MASK_BACKEND=numba``."""
    if os.environ.get("NMSPARSE_MASK_BACKEND", "").lower() == "numba":
        return None
    lib, _ = build_cached(_MASKS_SOURCE, f"nmsparse_masks_{variant}", BASE_FLAGS + MASK_VARIANTS[variant],
                          "mask kernels")
    if lib is not None:
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.nms_mask_topk4.argtypes = [ptr, ptr, i64, i64, i64, c_int, c_int, c_int]
        lib.nms_mask_decay_into.argtypes = [ptr, ptr, ptr, ctypes.c_float, i64, c_int]
        lib.nms_mask_lanes.restype = c_int
    return lib


def status() -> str:
    """Which mask kernels run here, in words (``nmsparse env``)."""
    lib = cpp_library()
    numba = "numba" if available() else "the torch reference (numba not installed)"
    if lib is not None:
        return f"C++, {lib.nms_mask_lanes()} floats per vector, for m = 4 in training; {numba} for the rest"
    return f"{numba} (no C++ mask kernels: no compiler, or NMSPARSE_MASK_BACKEND=numba)"


def supports(m: int, out: torch.Tensor | None) -> bool:
    """Whether :func:`topk_strided` can compute this mask here (``out``: a float buffer, or None for bool)."""
    if out is not None and (out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous()):
        return False
    return (out is not None and m == 4 and cpp_library() is not None) or available()


@functools.cache
def _kernels():
    # numba's kernels live at the top level of their own module, so that its on-disk cache (keyed by
    # the function's module and qualified name) hits in every later process: no JIT after the first
    from . import _topk_numba as k

    return k.flat_4, k.flat_m, k.strided_4, k.strided_m


def decay_grad(grad_out: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, decay: float) -> torch.Tensor | None:
    """``grad_out + decay * (weight - out)`` in one fused pass (contiguous float32 CPU tensors of one
    shape), or None where that does not apply or numba is missing (the caller uses torch)."""
    if not _fusable(grad_out, weight, out):
        return None
    from . import _topk_numba

    res = torch.empty_like(grad_out)
    with torch_threads():
        _topk_numba.decay_grad(grad_out.view(-1).numpy(), weight.detach().view(-1).numpy(), out.view(-1).numpy(),
                               float(decay), res.view(-1).numpy())
    return res


def decay_into(grad: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, decay: float) -> bool:
    """``grad += decay * (1 - keep) * weight`` in place in one fused pass (C++, else numba); False
    (nothing done) where that does not apply or neither is here (the caller uses torch)."""
    if not _fusable(grad, weight, keep, need_numba=False):
        return False
    lib = cpp_library()
    if lib is not None:
        lib.nms_mask_decay_into(grad.data_ptr(), weight.detach().data_ptr(), keep.data_ptr(), float(decay),
                                grad.numel(), torch.get_num_threads())
        return True
    if not available():
        return False
    from . import _topk_numba

    with torch_threads():
        _topk_numba.decay_into(grad.view(-1).numpy(), weight.detach().view(-1).numpy(), keep.view(-1).numpy(),
                               float(decay))
    return True


def _fusable(*tensors: torch.Tensor, need_numba: bool = True) -> bool:
    first = tensors[0]
    return (not need_numba or available()) and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.shape == first.shape
        for t in tensors
    )


@functools.cache
def available() -> bool:
    try:
        _kernels()
    except ImportError:
        return False
    return True


def topk_strided(scores: torch.Tensor, outer: int, width: int, inner: int, m: int, k: int,
                 absolute: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``k`` of every group of ``m`` along the middle axis of ``scores`` viewed as [outer, width, inner].

    Returns a bool mask with the shape of ``scores`` (no permuted copies are made). With ``out`` (a
    contiguous float32 CPU tensor shaped like ``scores``, e.g. a parametrization's 0/1 buffer) the
    mask is written there as 1.0 / 0.0 instead, in the same pass, and ``out`` is returned.
    """
    flat = scores.detach().to(torch.float32).contiguous().reshape(-1)
    if out is None:
        result = torch.empty(flat.shape, dtype=torch.bool)
        dst, one = result.numpy().view(np.uint8), np.uint8(1)
    else:
        if (
            out.dtype != torch.float32
            or out.device.type != "cpu"
            or not out.is_contiguous()
            or out.shape != scores.shape
        ):
            raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {list(scores.shape)}")
        result = out
        lib = cpp_library() if m == 4 else None
        if lib is not None:
            lib.nms_mask_topk4(flat.data_ptr(), out.data_ptr(), outer, width, inner, int(k), int(bool(absolute)),
                               torch.get_num_threads())
            return out
        dst, one = out.view(-1).numpy().view(np.int32), np.int32(_ONE_BITS)
    flat_4, flat_m, strided_4, strided_m = _kernels()
    src, k, absolute = flat.numpy(), int(k), bool(absolute)
    with torch_threads():
        if inner == 1:
            flat_4(src, k, absolute, one, dst) if m == 4 else flat_m(src, int(m), k, absolute, one, dst)
        elif m == 4:
            strided_4(src, outer, width, inner, k, absolute, one, dst)
        else:
            strided_m(src, outer, width, inner, int(m), k, absolute, one, dst)
    return out if out is not None else result.reshape(scores.shape)


@contextlib.contextmanager
def torch_threads():
    """Run numba kernels on torch's thread count, and give torch its count back afterwards.

    numba's OpenMP layer sets the calling thread's OpenMP thread count when it launches, which
    silently changed torch's own ``get_num_threads()`` (and with it the reduction order, so results
    drifted between otherwise identical runs). This keeps the two in step.
    """
    import numba

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def topk_rows(scores: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """Bool mask of the top ``k`` of each row of a CPU ``[G, m]`` score tensor (of |scores| if ``absolute``)."""
    return topk_strided(scores, scores.shape[0], scores.shape[1], 1, scores.shape[1], k, absolute)
