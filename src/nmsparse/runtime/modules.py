"""Inference modules that run packed sparse weights with the CPU kernels (float32, no autograd).

:class:`SparseLinear` multiplies ``[..., in]`` inputs directly. :class:`SparseConv2d` runs a 1x1
convolution (no padding) as a per-pixel GEMM without im2col, and other kernels as an implicit GEMM
on the padded input. Both accept any input layout (non-contiguous, channels-last) and any batch
size, and give the dense-with-zeros layer's output within float32 summation-order differences.

``forward`` calls one PyTorch operator (:mod:`nmsparse.runtime.ops`) on the module's buffers, so
``torch.compile`` (fullgraph), ``torch.export`` and ``torch.jit.trace`` see the layer as one op. In
plain eager calls (:func:`~nmsparse.runtime.ops.eager`) it runs the operator's CPU implementation
without the dispatcher, and a one-row input of a SparseLinear goes straight to the batch-1 kernel
with its arguments bound once (the decode step of a language model: measured ~15 us of Python a
call around the kernel instead of ~60 us, 210 calls per token of SmolLM2).
Constructing a module loads the kernel library (:func:`nmsparse.runtime._native.require`): it
raises :class:`~nmsparse.runtime._native.KernelsUnavailable` where the kernels cannot be built.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import _native, ops
from .formats import BlockPacked, NMPacked

__all__ = ["SparseLinear", "SparseConv2d", "QuantLinear"]

Packed = BlockPacked | NMPacked


def _in_huge_pages(layout, *fields: str):
    """A shallow copy of ``layout`` whose large arrays ``fields`` live in huge-page memory
    (:func:`~nmsparse.runtime._native.huge_pages`): the module then holds that one copy."""
    out = copy.copy(layout)
    for name in fields:
        setattr(out, name, _native.huge_pages(getattr(layout, name)))
    return out


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # a conversion only where needed: under torch.export a no-op .float() still becomes a graph op
    return x if x.dtype == torch.float32 else x.float()


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class _BoundCall(nn.Module):
    """The one-token fast path shared by the packed Linear modules: a batch-1 kernel call bound once
    (:func:`~nmsparse.runtime._native.gemv_call`) and reused while the arrays it points into stay the
    same objects. Subclasses give ``_call_key()`` (the tensors the plan reads, then the activation)
    and ``_call_arrays()``."""

    def _gemv(self):
        """The bound batch-1 kernel call of this layer, or None where the bias is not a contiguous
        float32 tensor. Rebuilt when a buffer or the bias was replaced (``load_state_dict`` refreshing
        derived arrays, assignment) or the activation changed (checked by identity: a dict lookup
        each), and dropped by ``_apply`` (``.to()`` may give a parameter new storage in place)."""
        key = self._call_key()
        c = self.__dict__.get("_gemv_cache")
        if c is not None and all(a is b for a, b in zip(c[0][:-1], key[:-1])) and c[0][-1] == key[-1]:
            return c[1]
        b = self._parameters.get("bias")
        if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
            return None
        call = _native.gemv_call(self._call_arrays(), b, self.activation == "relu")
        self.__dict__["_gemv_cache"] = (key, call)
        return call

    def _one_token(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output of one token through the bound call (a decode step), or None where the fast path
        does not apply (not a plain contiguous float32 CPU row, or no bound call)."""
        if not (x.numel() == self.in_features and x.dtype is torch.float32 and x.is_cpu and x.is_contiguous()):
            return None
        call = self._gemv()
        if call is None:
            return None
        dims = x.dim()
        shape = self._token_shapes[dims - 1] if dims <= 4 else (1,) * (dims - 1) + self._token_shapes[0]
        y = torch.empty(shape, dtype=torch.float32)  # float32 whatever torch's default dtype
        call(x.data_ptr(), y.data_ptr(), 1 if self._serial else torch.get_num_threads())
        return y

    _WEIGHT_BUFFERS: tuple[str, ...] = ()  # the buffers construction places in huge-page memory

    def _weights_to_huge_pages(self) -> None:
        """Move this module's weight buffers into huge-page memory, where construction put them."""
        for name in self._WEIGHT_BUFFERS:
            t = self._buffers.get(name)
            if t is not None and t.numel() and t.device.type == "cpu":
                self._buffers[name] = torch.from_numpy(_native.huge_pages(t.numpy()))
        self.__dict__.pop("_gemv_cache", None)

    def _set_token_shapes(self) -> None:
        # the output shape of one token given as [in], [1, in], [1, 1, in] or [1, 1, 1, in]
        self._token_shapes = tuple((1,) * lead + (self.out_features,) for lead in range(4))

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_gemv_cache", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # the bound call holds raw pointers: rebuilt after a copy or unpickling
        state = dict(super().__getstate__())
        state.pop("_gemv_cache", None)
        return state

    def __deepcopy__(self, memo: dict) -> _BoundCall:
        """A copy whose weights sit in huge-page memory like the original's (a plain deepcopy's buffers are
        ordinary 4 KB pages): a copied model decodes as fast as the model, and the layer choice's timing
        copies (:func:`~nmsparse.runtime.timing.cold_copies`) read their weights as the model's layers do."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        new._weights_to_huge_pages()
        return new


class _PackedModule(_BoundCall):
    _plain = False  # set per module by _register_packed (False: a module pickled before it existed)
    _WEIGHT_BUFFERS = ("vals", "codes")

    def _register_packed(self, packed: Packed, bias: torch.Tensor | None, input_perm: list[int] | None) -> None:
        _native.require()  # built and loaded now, never inside forward
        packed = _in_huge_pages(packed, "vals", *(("codes",) if isinstance(packed, NMPacked) else ()))
        self._packed = packed
        self.shape = tuple(packed.shape)
        perm = None if input_perm is None else torch.as_tensor(input_perm, dtype=torch.long)
        self.register_buffer("input_perm", perm, persistent=False)
        self._plain = perm is None  # no input gather: the one-token fast path applies
        # a one-token product this small runs on the calling thread (see _native.SERIAL_GEMV_BYTES)
        self._serial = packed.nbytes < _native.SERIAL_GEMV_BYTES
        self.kind = "block" if isinstance(packed, BlockPacked) else "nm"
        # the packed arrays are also buffers, so .state_dict() and .to() see them
        if isinstance(packed, BlockPacked):
            self.register_buffer("cols", torch.from_numpy(packed.cols), persistent=True)
            self.register_buffer("kstart", torch.from_numpy(packed.kstart), persistent=False)  # derived from cols
            self.n = self.m = 0
        else:
            self.register_buffer("codes", torch.from_numpy(packed.codes), persistent=True)
            self.n, self.m = packed.n, packed.m
        self.register_buffer("vals", torch.from_numpy(packed.vals), persistent=True)
        # registered even when None (as nn.Linear does), so the one-token path finds it in _parameters
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().float().clone(), requires_grad=False))
        self.activation: str | None = None  # "relu": applied as the output is stored (see runtime.fuse)
        self.register_load_state_dict_post_hook(_PackedModule._refresh_derived)

    @property
    def packed(self) -> Packed:
        """The packed layout over this module's buffers (rebuilt if the buffers were replaced, as a
        deepcopy or ``.to()`` does, so that folding into it changes what ``forward`` reads)."""
        p = self._packed
        if p.vals.ctypes.data != self.vals.data_ptr() or p.vals.size != self.vals.numel():
            if self.kind == "block":
                p = BlockPacked(self.cols.numpy(), self.vals.numpy(), self.shape)
                self.kstart = torch.from_numpy(p.kstart)
            else:
                p = NMPacked(self.codes.numpy(), self.vals.numpy(), self.n, self.m, self.shape)
            self._packed = p
        return p

    @staticmethod
    def _refresh_derived(module: _PackedModule, incompatible_keys) -> None:
        """``load_state_dict`` copies new values into the packed arrays in place (the buffers share
        their memory): rebuild what is derived from them (chunk starts, caches), which would
        otherwise describe the old mask."""
        module.packed.refresh()
        if module.kind == "block":
            module.kstart = torch.from_numpy(module.packed.kstart)

    @property
    def _relu(self) -> bool:
        return self.activation == "relu"

    @property
    def _bias(self) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or (b.dtype == torch.float32 and b.is_contiguous()) else b.detach().float().contiguous()

    def _check(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"{type(self).__name__} runs on the CPU; got an input on {x.device}")
        # an input index map (channel permutation that could not be folded): gather first
        return x if self.input_perm is None else x.index_select(dim, self.input_perm)

    def _call_key(self) -> tuple:
        buffers = self._buffers
        index = buffers["codes"] if self.kind == "nm" else buffers["cols"]
        return buffers["vals"], index, buffers.get("kstart"), self._parameters.get("bias"), self.activation

    def _call_arrays(self) -> _native.BlockArrays | _native.NMArrays:
        vals, index, kstart, _, _ = self._call_key()
        if self.kind == "block":
            return _native.BlockArrays(index, kstart, vals)
        return _native.NMArrays(index, vals, *self.shape, self.n, self.m)

    @property
    def weight_nbytes(self) -> int:
        return self.packed.nbytes


class SparseLinear(_PackedModule):
    """A Linear layer with a packed sparse weight."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None, input_perm: list[int] | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self._set_token_shapes()
        self._register_packed(packed, bias, input_perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # no autograd: the kernels read raw buffers
        direct = ops.eager(x)
        if direct and self._plain and (y := self._one_token(x)) is not None:  # one token: the bound kernel
            return y
        x = self._check(x, x.dim() - 1)
        x2d = _as_float(x.reshape(-1, self.in_features))
        if direct:
            y = self._eager(x2d)
        elif self.kind == "block":
            y = ops.block_linear(x2d, self.cols, self.kstart, self.vals, self._bias, self._relu)
        else:
            y = ops.nm_linear(x2d, self.codes, self.vals, self._bias, self.out_features, self.n, self.m, self._relu)
        return _like(y.reshape(*x.shape[:-1], self.out_features), x)

    def _eager(self, x2d: torch.Tensor) -> torch.Tensor:
        """What the operator computes, called directly (see :func:`~nmsparse.runtime.ops.eager`)."""
        if self.kind == "block":
            return ops.cpu_impl("block_linear")(x2d, self.cols, self.kstart, self.vals, self._bias, self._relu)
        return ops.cpu_impl("nm_linear")(x2d, self.codes, self.vals, self._bias, self.out_features, self.n, self.m,
                                         self._relu)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return f"in={self.in_features}, out={self.out_features}, kind={self.kind}{act}"


class SparseConv2d(_PackedModule):
    """A Conv2d (groups = 1, zero padding) with a packed sparse weight.

    Convolutions other than unpadded 1x1 ones run as an implicit GEMM on the padded input (cut
    into phase planes for strides > 1; :func:`nmsparse.runtime._native.implicit_conv`, no im2col
    buffer); im2col only where the offsets would overflow int32.

    Args:
        packed: the packed ``[out, in * kh * kw]`` matrix, columns in ``order``.
        order: ``"chw"`` (PyTorch's flatten order, 1xN blocks) or ``"hwc"`` (n:m along input channels).
    """

    def __init__(self, packed: Packed, bias: torch.Tensor | None, conv: nn.Conv2d, order: str,
                 input_perm: list[int] | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        if isinstance(conv.padding, str):
            raise ValueError("SparseConv2d needs numeric padding; string padding ('same', 'valid') is not supported")
        self.order = order
        self._register_packed(packed, bias, input_perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # no autograd: the kernels read raw buffers
        x = self._check(x, 1)
        xf = _as_float(x)
        geometry = (list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation))
        direct = ops.eager(xf)
        if self.kind == "block":
            conv = ops.cpu_impl("block_conv2d") if direct else ops.block_conv2d
            y = conv(xf, self.cols, self.kstart, self.vals, self._bias, *geometry, self._relu)
        else:
            conv = ops.cpu_impl("nm_conv2d") if direct else ops.nm_conv2d
            y = conv(xf, self.codes, self.vals, self._bias, self.out_channels, self.n, self.m, *geometry,
                              self.order == "hwc", self._relu)
        return _like(y, x)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"kind={self.kind}, order={self.order}{act}")


class QuantLinear(_BoundCall):
    """A Linear layer whose weight is stored quantized (:class:`~nmsparse.runtime.quant.QPacked`):
    the kept values of an n:m or 1xN layout, or a dense weight (``kind="dense"``), as 8- or 4-bit
    integers with one float16 scale per group along the input axis.

    Computes ``A(x) @ dequantized(W).T + bias`` (float32), where ``A`` is the identity with
    ``activations="fp32"`` and, with ``"int8"`` (the default, where the layout allows it: n:m and
    dense), :func:`~nmsparse.runtime.quant.quantize_activations` over blocks of one weight group's
    columns, as llama.cpp's Q8_0 products quantize theirs. One token runs the batch-1 kernel (with
    int8 activations and AVX-512 VNNI + VBMI, integer dot products; elsewhere the weights are
    widened to float in registers); more rows dequantize the weight once per call into the float32
    layout and run the float32 product on ``A(x)`` (``torch.ops.nmsparse.q_linear``, one operator for
    ``torch.compile`` / ``export``). Every path computes the same function up to float32 rounding.
    """

    _KINDS = {"nm": 0, "block": 1, "dense": 2}
    _WEIGHT_BUFFERS = ("qweight", "scales", "index")

    def __init__(self, packed, bias: torch.Tensor | None, input_perm: list[int] | None = None,
                 activations: str = "int8") -> None:
        super().__init__()
        _native.require()
        from .quant import activation_block

        if activations not in ("int8", "fp32"):
            raise ValueError(f"activations {activations!r} is not one of int8, fp32")
        block = activation_block(packed) if activations == "int8" else None
        self.act_block = block or 0  # columns per activation scale; 0: float32 activations
        packed = _in_huge_pages(packed, "q", "scales")
        if packed.kind == "nm":
            packed.index = _in_huge_pages(packed.index, "codes")
        self._packed = packed
        self.out_features, self.in_features = packed.shape
        self.kind, self.bits, self.group = packed.kind, packed.bits, packed.group
        self.n = self.m = self.block = 0
        index, kstart = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
        if packed.kind == "nm":
            index, self.n, self.m = torch.from_numpy(packed.index.codes), packed.index.n, packed.index.m
        elif packed.kind == "block":
            index, kstart = torch.from_numpy(packed.index.cols), torch.from_numpy(packed.index.kstart)
            self.block = self.out_features // packed.index.cols.shape[0]
        self.register_buffer("index", index, persistent=True)
        self.register_buffer("kstart", kstart, persistent=False)
        self.register_buffer("qweight", torch.from_numpy(packed.q), persistent=True)
        self.register_buffer("scales", torch.from_numpy(packed.scales), persistent=True)
        perm = None if input_perm is None else torch.as_tensor(input_perm, dtype=torch.long)
        self.register_buffer("input_perm", perm, persistent=False)
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().float().clone(), requires_grad=False))
        self.activation: str | None = None
        self._serial = packed.nbytes < _native.SERIAL_GEMV_BYTES
        self._set_token_shapes()

    @property
    def weight_nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in (self.index, self.qweight, self.scales)))

    @property
    def scheme(self):
        from .quant import WeightScheme

        return WeightScheme(self.bits, self.group)

    def _arrays(self) -> _native.QArrays:
        return _native.QArrays(self._KINDS[self.kind], self.index, self.kstart, self.qweight, self.scales,
                               self.out_features, self.in_features, self.n, self.m, self.block, self.bits, self.group,
                               self.act_block > 0)

    def _call_key(self) -> tuple:
        buffers = self._buffers
        return buffers["qweight"], buffers["scales"], buffers["index"], self._parameters.get("bias"), self.activation

    def _call_arrays(self) -> _native.QArrays:
        return self._arrays()

    def dequantized_weight(self) -> torch.Tensor:
        """The ``[out, in]`` float32 weight this layer computes with (input order of the original layer)."""
        w = self._packed.dense() if self._packed is not None else None
        if self.input_perm is not None:
            restored = torch.empty_like(w)
            restored[:, self.input_perm] = w
            w = restored
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        direct = ops.eager(x)
        if direct and self.input_perm is None and (y := self._one_token(x)) is not None:
            return y
        if x.device.type != "cpu":
            raise RuntimeError(f"QuantLinear runs on the CPU; got an input on {x.device}")
        xi = x if self.input_perm is None else x.index_select(x.dim() - 1, self.input_perm)
        x2d = _as_float(xi.reshape(-1, self.in_features))
        bias = self.bias if self.bias is None else self.bias.float().contiguous()
        args = (x2d, self.index, self.kstart, self.qweight, self.scales, bias, self._KINDS[self.kind],
                self.out_features, self.in_features, self.n, self.m, self.block, self.bits, self.group,
                self.act_block, self.activation == "relu")
        y = ops.cpu_impl("q_linear")(*args) if direct else ops.q_linear(*args)
        return _like(y.reshape(*x.shape[:-1], self.out_features), x)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        acts = f"int8 (blocks of {self.act_block})" if self.act_block else "fp32"
        return (f"in={self.in_features}, out={self.out_features}, kind={self.kind}, weights=int{self.bits}, "
                f"group={self.group}, activations={acts}{act}")
