"""Sparse inference: packed layouts, CPU kernels, runtime modules, and :func:`convert`.

Importing this package registers the ``torch.ops.nmsparse`` operators and compiles nothing; the
kernel library is built (once per machine, then cached) by ``convert``, ``load_compressed`` or a
sparse module's constructor, never inside ``forward``.
"""

from .compressed import load_compressed, save_compressed
from .convert import ConvertRow, convert, infer_pattern, to_semi_structured
from .formats import BlockPacked, FormatError, NMPacked, gemm_matrix, pack_block, pack_nm
from .fuse import FuseResult, fuse
from .modules import SparseConv2d, SparseLinear

__all__ = [
    "BlockPacked",
    "ConvertRow",
    "FormatError",
    "FuseResult",
    "NMPacked",
    "SparseConv2d",
    "SparseLinear",
    "convert",
    "fuse",
    "gemm_matrix",
    "infer_pattern",
    "load_compressed",
    "pack_block",
    "pack_nm",
    "save_compressed",
    "to_semi_structured",
]
