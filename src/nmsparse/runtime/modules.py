"""Inference modules that run packed sparse weights with the CPU kernels (float32, no autograd).

:class:`SparseLinear` multiplies ``[..., in]`` inputs directly. :class:`SparseConv2d` runs a 1x1
convolution (stride 1, no padding) as a per-pixel GEMM without im2col, and other kernels as an
implicit GEMM on the padded input (the numba fallback through im2col in the column order the
packed weight uses). Both accept any input layout
(non-contiguous, channels-last) and any batch size, and give the dense-with-zeros layer's output
within float32 summation-order differences.
"""

from __future__ import annotations

import torch
from torch import nn

from .._topk_cpu import torch_threads
from .formats import BlockPacked, NMPacked

__all__ = ["SparseLinear", "SparseConv2d", "packed_matmul", "packed_matmul_t"]

Packed = BlockPacked | NMPacked


def _block_batched_t(xt: torch.Tensor, packed: BlockPacked) -> torch.Tensor:
    """Batched 1xN product through PyTorch's batched GEMM: gather the kept input rows of a
    cache-sized chunk of block rows (``[r, K, batch]``), then one ``[B, K] x [K, batch]`` product per
    block row. Measured faster than the numba rank-1 kernel for batch > 1 (docs/runtime.md)."""
    cols = packed.cols_index
    vals = torch.from_numpy(packed.vals)  # [R, K, B]
    rows, kept, block = vals.shape
    batch = xt.shape[1]
    out = torch.empty(rows, block, batch)
    step = max(1, min(rows, (1 << 17) // max(1, kept * batch)))  # gathered chunk ~0.5 MB
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        gathered = xt.index_select(0, cols[r0:r1].reshape(-1)).view(r1 - r0, kept, batch)
        torch.bmm(vals[r0:r1].transpose(1, 2), gathered, out=out[r0:r1])
    return out.view(rows * block, batch)


def _epilogue(y: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    if bias is not None:
        y += bias.unsqueeze(1)
    return y.relu_() if relu else y


def packed_matmul_t(xt: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None,
                    relu: bool = False) -> torch.Tensor:
    """``W @ xt`` (+ ``bias[out]``, then ReLU with ``relu``) for a packed W and ``xt[columns, batch]``
    (CPU, float32): ``[out, batch]``.

    Runs the C++ kernels (:mod:`nmsparse.runtime._native`) where they build, else the numba ones.
    The transposed form lets convolutions hand over their NCHW / im2col buffers without copies. The
    C++ kernels add the bias and apply the ReLU themselves (the 1xN ones as they store the output).
    """
    xt = xt.detach().to(torch.float32)
    from . import _native

    if _native.available():
        if isinstance(packed, BlockPacked):
            return _native.block_mm(xt, packed, bias=bias, relu=relu)
        return _native.nm_mm(xt, packed, bias=bias, relu=relu)
    if isinstance(packed, BlockPacked) and xt.shape[1] > 1:
        return _epilogue(_block_batched_t(xt.contiguous(), packed), bias, relu)
    from . import _kernels  # numba is imported at the first packed call, not with the package

    x = xt.contiguous().numpy()
    with torch_threads():
        if isinstance(packed, BlockPacked):
            y = _kernels.block_matmul_t(x, packed.cols, packed.vals)
        else:
            offs, vals = packed.row_major_cached
            y = _kernels.nm_matmul_t(x, offs, vals, packed.n, packed.m)
    return _epilogue(torch.from_numpy(y), bias, relu)


def packed_matmul(x2d: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None,
                  relu: bool = False) -> torch.Tensor:
    """``x2d[rows, columns] @ W.T`` (+ bias, ReLU) for a packed W (CPU, float32): ``[rows, out]``."""
    return packed_matmul_t(x2d.t(), packed, bias, relu).t()


class _PackedModule(nn.Module):
    def _register_packed(self, packed: Packed, bias: torch.Tensor | None, input_perm: list[int] | None) -> None:
        self.packed = packed
        self.input_perm = None if input_perm is None else torch.as_tensor(input_perm, dtype=torch.long)
        self.kind = "block" if isinstance(packed, BlockPacked) else "nm"
        # the packed arrays are also buffers, so .state_dict() and .to() see them
        if isinstance(packed, BlockPacked):
            self.register_buffer("cols", torch.from_numpy(packed.cols), persistent=True)
        else:
            self.register_buffer("codes", torch.from_numpy(packed.codes), persistent=True)
        self.register_buffer("vals", torch.from_numpy(packed.vals), persistent=True)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.activation: str | None = None  # "relu": applied as the output is stored (see runtime.fuse)
        self.register_load_state_dict_post_hook(_PackedModule._refresh_derived)

    @staticmethod
    def _refresh_derived(module: _PackedModule, incompatible_keys) -> None:
        """``load_state_dict`` copies new values into the packed arrays in place (the buffers share
        their memory): rebuild what is derived from them (chunk starts, caches), which would
        otherwise describe the old mask."""
        module.packed.refresh()
        getattr(module, "_offsets", {}).clear()

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

    @property
    def weight_nbytes(self) -> int:
        return self.packed.nbytes


class SparseLinear(_PackedModule):
    """A Linear layer with a packed sparse weight."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None, input_perm: list[int] | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self._register_packed(packed, bias, input_perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # no autograd: the kernels read raw buffers
        x = self._check(x, x.dim() - 1)
        lead = x.shape[:-1]
        y = packed_matmul(x.reshape(-1, self.in_features), self.packed, self._bias, self._relu)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return f"in={self.in_features}, out={self.out_features}, kind={self.kind}{act}"


class SparseConv2d(_PackedModule):
    """A Conv2d (groups = 1, zero padding) with a packed sparse weight.

    Convolutions other than stride-1 1x1 ones run as an implicit GEMM on the padded input (cut
    into phase planes for strides > 1; :func:`nmsparse.runtime._native.implicit_conv`, no im2col
    buffer); im2col remains the path of the numba fallback.

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
        self.order = order
        self._offsets: dict = {}  # input offsets of the implicit GEMM, per input geometry
        self._register_packed(packed, bias, input_perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # no autograd: the kernels read raw buffers
        x = self._check(x, 1)
        batch, _, height, width = x.shape
        kh, kw = self.kernel_size
        pointwise = (kh, kw) == (1, 1) and self.padding in ((0, 0), 0) and self.dilation == (1, 1)
        if pointwise:
            xs = x[:, :, :: self.stride[0], :: self.stride[1]].float()
            oh, ow = xs.shape[2], xs.shape[3]
            # [in, N*H*W]: a free view of an NCHW batch of one
            xt = xs[0].reshape(self.in_channels, -1) if batch == 1 else xs.transpose(0, 1).reshape(self.in_channels, -1)
        else:
            if isinstance(self.padding, str):
                raise RuntimeError("string padding is not supported by SparseConv2d")
            from . import _native

            if _native.available():
                y = _native.implicit_conv(x, self.packed, (kh, kw), self.stride, self.padding, self.dilation, self.order,
                                          self._offsets, bias=self._bias, relu=self._relu)
                if y is not None:  # [out, N, oh, ow] view: one copy makes it NCHW
                    return y.transpose(0, 1).contiguous().to(x.dtype)
            oh = (height + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
            ow = (width + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
            if _native.available():  # offsets past int32: im2col straight into [in*k*k, N*L], weight's order
                xt = _native.im2col(x, (kh, kw), self.stride, self.padding, self.dilation, self.order)
            else:
                cols = nn.functional.unfold(x.float(), (kh, kw), self.dilation, self.padding, self.stride)  # [N, in*k*k, L]
                if self.order == "hwc":
                    cols = cols.view(batch, self.in_channels, kh * kw, -1).transpose(1, 2)
                cols = cols.reshape(batch, -1, oh * ow)
                xt = cols[0] if batch == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [in*k*k, N*L]
        y = packed_matmul_t(xt, self.packed, self._bias, self._relu)  # [out, N*L]
        return y.view(self.out_channels, batch, oh, ow).transpose(0, 1).to(x.dtype)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"kind={self.kind}, order={self.order}{act}")
