"""The sparse products as PyTorch operators (``torch.ops.nmsparse.*``), with fake implementations.

Registered with :mod:`torch.library` so that PyTorch's own tools see one opaque operator per sparse
layer instead of Python code that reads raw pointers: ``torch.compile(model, fullgraph=True)``
traces a converted model without graph breaks, ``torch.export.export`` captures it (the exported
program calls these operators; load it in a process that imported ``nmsparse.runtime``), and
``torch.jit.trace`` records the operator calls, so a traced model computes what the eager one does.
The fake (meta) implementations give each output's shape and strides from the inputs' alone.

Every operator takes the input and the packed arrays (module buffers) plus the integers of the
layout; bias (may be None) and ReLU are applied as the kernel stores its output. All run on CPU
float32 tensors and return new tensors (no aliasing, no mutation). The kernel library must have
been loaded before (``runtime._native.require``, which ``convert``, ``load_compressed`` and the
modules' constructors call); nothing is built or looked up on disk inside a call.

Schemas::

    block_linear(x[T, in], cols, kstart, vals, bias?, relu) -> [T, out]      (contiguous)
    nm_linear(x[T, in], codes, vals, bias?, out, n, m, relu) -> [T, out]    (contiguous)
    block_conv2d(x[N, C, H, W], cols, kstart, vals, bias?, kernel, stride, padding, dilation, relu)
        -> [N, out, oh, ow] (contiguous)
    nm_conv2d(x[N, C, H, W], codes, vals, bias?, out, n, m, kernel, stride, padding, dilation, hwc, relu)
        -> [N, out, oh, ow] (contiguous)
    q_linear(x[T, in], index, kstart, q, scales, bias?, kind, out, in, n, m, block, bits, group, act_block, relu)
        -> [T, out]
        (a quantized layout, runtime.quant; kind 0 n:m, 1 1xN, 2 dense)
"""

from __future__ import annotations

import torch

from . import _native
from ._native import BlockArrays, NMArrays

__all__ = ["block_linear", "nm_linear", "block_conv2d", "nm_conv2d", "q_linear", "eager", "cpu_impl"]

_CONV_ARGS = "SymInt[2] kernel, SymInt[2] stride, SymInt[2] padding, SymInt[2] dilation"
_SCHEMAS = {
    "block_linear": "(Tensor x, Tensor cols, Tensor kstart, Tensor vals, Tensor? bias, bool relu) -> Tensor",
    "nm_linear": "(Tensor x, Tensor codes, Tensor vals, Tensor? bias, SymInt out_features, int n, int m, bool relu)"
                 " -> Tensor",
    "block_conv2d": f"(Tensor x, Tensor cols, Tensor kstart, Tensor vals, Tensor? bias, {_CONV_ARGS}, bool relu)"
                    " -> Tensor",
    "nm_conv2d": f"(Tensor x, Tensor codes, Tensor vals, Tensor? bias, SymInt out_channels, int n, int m, {_CONV_ARGS},"
                 " bool hwc, bool relu) -> Tensor",
    "q_linear": "(Tensor x, Tensor index, Tensor kstart, Tensor q, Tensor scales, Tensor? bias, int kind,"
                " SymInt out_features, int in_features, int n, int m, int block, int bits, int group, int act_block,"
                " bool relu)"
                " -> Tensor",
}

_LIB = torch.library.Library("nmsparse", "DEF")  # noqa: TOR901 - the project's own operator namespace
for _name, _schema in _SCHEMAS.items():
    _LIB.define(_name + _schema)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------- CPU implementations
def _rows_major(y: torch.Tensor) -> torch.Tensor:
    """``[out, T]`` kernel output as a contiguous ``[T, out]``: what nn.Linear returns, so the ops after
    the layer (reshapes into heads, residual adds, norms) read it at full speed; a transposed view
    made them copy it through PyTorch's strided path (vit_small at 1x16: 0.85x of dense -> see
    docs/benchmarks.md). The C++ tile transpose costs one pass over the output."""
    out, tokens = y.shape
    if tokens == 1:
        return y.view(1, out)
    rows_major = torch.empty(tokens, out, dtype=torch.float32)
    _native.loaded().nms_transpose(y.data_ptr(), out, tokens, y.stride(0), rows_major.data_ptr(), out,
                                   torch.get_num_threads())
    return rows_major


def _block_linear(x, cols, kstart, vals, bias, relu):
    return _rows_major(_native.block_mm(x.t(), BlockArrays(cols, kstart, vals), bias, relu))


def _nm_linear(x, codes, vals, bias, out_features, n, m, relu):
    return _rows_major(_native.nm_mm(x.t(), NMArrays(codes, vals, out_features, x.shape[1], n, m), bias, relu))


def _conv(x, w, out_ch, kernel, stride, padding, dilation, order, bias, relu):
    batch, channels, height, width = x.shape
    kh, kw = kernel
    oh, ow = (_out_size(height, kh, stride[0], padding[0], dilation[0]),
              _out_size(width, kw, stride[1], padding[1], dilation[1]))
    mm = _native.block_mm if isinstance(w, BlockArrays) else _native.nm_mm
    if (kh, kw) == (1, 1) and tuple(padding) == (0, 0):  # a per-pixel GEMM on the (strided) input itself
        xs = x[:, :, :: stride[0], :: stride[1]].float()
        # [in, N*H*W]: a free view of an NCHW batch of one
        xt = xs[0].reshape(channels, -1) if batch == 1 else xs.transpose(0, 1).reshape(channels, -1)
        y = mm(xt, w, bias, relu)
    else:
        y = _native.implicit_conv(x, w, (kh, kw), tuple(stride), tuple(padding), tuple(dilation), order, bias, relu)
        if y is not None:  # [out, N, oh, ow] view: one copy makes it NCHW
            return y.transpose(0, 1).contiguous()
        # offsets past int32: im2col straight into [in*k*k, N*L], in the weight's column order
        y = mm(_native.im2col(x, (kh, kw), tuple(stride), tuple(padding), tuple(dilation), order), w, bias, relu)
    return y.view(out_ch, batch, oh, ow).transpose(0, 1).contiguous()


def _block_conv2d(x, cols, kstart, vals, bias, kernel, stride, padding, dilation, relu):
    return _conv(x, BlockArrays(cols, kstart, vals), vals.shape[0] * vals.shape[2], kernel, stride, padding, dilation,
                 "chw", bias, relu)


def _nm_conv2d(x, codes, vals, bias, out_channels, n, m, kernel, stride, padding, dilation, hwc, relu):
    columns = x.shape[1] * kernel[0] * kernel[1]
    return _conv(x, NMArrays(codes, vals, out_channels, columns, n, m), out_channels, kernel, stride, padding,
                 dilation, "hwc" if hwc else "chw", bias, relu)


def _q_linear(x, index, kstart, q, scales, bias, kind, out_features, in_features, n, m, block, bits, group, act_block,
              relu):
    """A quantized Linear: one row runs the batch-1 kernel; more rows with int8 activations run the
    integer batched product where the build has one (AVX-512 VNNI, n:m and dense); otherwise the weight
    is dequantized once (one pass, in C++) and the float32 product of its layout (MKL for a dense one)
    runs on the rows' quantized activations (act_block > 0) or on the rows as they are."""
    w = _native.QArrays(kind, index, kstart, q, scales, out_features, in_features, n, m, block, bits, group,
                        act_block > 0)
    if x.shape[0] == 1:
        return _native.q_gemv(x[0], w, bias, relu).view(1, out_features)
    if act_block and (y := _native.q_gemm(x, w, bias, relu)) is not None:
        return y
    if act_block:
        from .quant import quantize_activations

        x = quantize_activations(x, act_block)
    vals = _native.q_dequant(w)
    if kind == 0:
        return _nm_linear(x, index, vals, bias, out_features, n, m, relu)
    if kind == 1:
        return _block_linear(x, index, kstart, vals, bias, relu)
    y = torch.nn.functional.linear(x, vals, bias)
    return torch.relu_(y) if relu else y


# ---------------------------------------------------------------- fake implementations
def _fake_linear(x, out_features):
    return x.new_empty((x.shape[0], out_features))


def _fake_conv(x, out_ch, kernel, stride, padding, dilation):
    oh = _out_size(x.shape[2], kernel[0], stride[0], padding[0], dilation[0])
    ow = _out_size(x.shape[3], kernel[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], out_ch, oh, ow))


_IMPLS = {
    "block_linear": (
        _block_linear,
        lambda x, cols, kstart, vals, bias, relu: _fake_linear(x, vals.shape[0] * vals.shape[2]),
    ),
    "nm_linear": (_nm_linear, lambda x, codes, vals, bias, out_features, n, m, relu: _fake_linear(x, out_features)),
    "block_conv2d": (
        _block_conv2d,
        lambda x, cols, kstart, vals, bias, kernel, stride, padding, dilation, relu: _fake_conv(
            x, vals.shape[0] * vals.shape[2], kernel, stride, padding, dilation
        ),
    ),
    "q_linear": (
        _q_linear,
        lambda x, index, kstart, q, scales, bias, kind, out_features, *rest: _fake_linear(x, out_features),
    ),
    "nm_conv2d": (
        _nm_conv2d,
        lambda x, codes, vals, bias, out_channels, n, m, kernel, stride, padding, dilation, hwc, relu: _fake_conv(
            x, out_channels, kernel, stride, padding, dilation
        ),
    ),
}


class InferenceOnlyError(RuntimeError):
    """A gradient was asked of a packed sparse kernel (the runtime's modules are inference-only)."""


def _no_backward(ctx, *grads):
    raise InferenceOnlyError("nmsparse runtime modules are inference-only: no gradient flows through a packed "
                             "sparse kernel; train the dense-with-zeros model (or its export) instead")


def _fresh(impl):
    """``impl`` whose output is never a view (a batch of one comes back as a reshape of the kernel's
    buffer): an operator's output must not alias anything, or autograd refuses in-place updates of it.
    The eager fast path calls ``impl`` itself and keeps the view."""
    def call(*args):
        y = impl(*args)
        return y if y._base is None else y.clone()

    return call


for _name, (_impl, _fake) in _IMPLS.items():
    _LIB.impl(_name, _fresh(_impl), "CPU")
    torch.library.register_fake(f"nmsparse::{_name}", _fake, lib=_LIB)
    # a forward with gradients on (a model called outside no_grad) gives an ordinary autograd output,
    # which in-place ops such as a residual `x += shortcut` may update; only a backward through it fails
    torch.library.register_autograd(f"nmsparse::{_name}", _no_backward, lib=_LIB)



def eager(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may run the operator's CPU implementation directly, without PyTorch's
    dispatcher: a plain tensor, not compiling, tracing or under any dispatch or function mode, and
    no gradient asked for. A Python operator's dispatch costs ~40 us a call (measured: a batch-1
    576x576 2:4 product takes ~27 us), 210 calls per token of a 135M decoder; everywhere else the
    modules call the operator, so ``torch.compile``, ``torch.export``, ``jit.trace`` and modes such as
    FlopCounterMode see it as before. The same implementation runs on both paths.

    The mode and tracing checks read three functions of ``torch._C`` (PyTorch has no public query for
    an active dispatch or function mode); where a PyTorch release lacks one of them, ``eager`` is always
    False and every call goes through the dispatcher (correct, ~40 us slower a call)."""
    if _PROBES is None:
        return False
    tracing_state, dispatch_modes, function_modes = _PROBES
    return (not _compiling() and type(x) is torch.Tensor and tracing_state() is None
            and not (x.requires_grad and torch.is_grad_enabled()) and not dispatch_modes() and not function_modes())


_compiling = torch.compiler.is_compiling


def _probes() -> tuple | None:
    """``(tracing state, dispatch-mode stack length, function-mode stack length)`` of ``torch._C`` (what
    ``torch.jit.is_tracing()`` and the mode stacks read, without their Python layers), or None where
    this PyTorch lacks one."""
    found = tuple(getattr(torch._C, name, None) for name in
                  ("_get_tracing_state", "_len_torch_dispatch_stack", "_len_torch_function_stack"))
    return None if any(f is None for f in found) else found


_PROBES = _probes()


def cpu_impl(name: str):
    """The CPU implementation registered for operator ``name`` (what the dispatcher calls)."""
    return _IMPLS[name][0]


block_linear = torch.ops.nmsparse.block_linear
nm_linear = torch.ops.nmsparse.nm_linear
block_conv2d = torch.ops.nmsparse.block_conv2d
nm_conv2d = torch.ops.nmsparse.nm_conv2d
q_linear = torch.ops.nmsparse.q_linear
