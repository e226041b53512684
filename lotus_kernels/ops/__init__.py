"""The custom ops (``torch.ops.lotus_kernels.*``), one file per op family, named as its kernel, test and benchmark.

- ``mask_compaction``: dense_to_bsr, bsr_transpose, compress_2to4,
  decompress_2to4, keep_indices (C++/CUDA extension; references in
  ``lotus_kernels.layouts``);
- ``block_sparse_matmul``, ``semi_structured_matmul``, ``patch_drop_attention``
  (Triton kernels in ``lotus_kernels.kernels``, each with its ``*_ref``);
- ``cusparselt``: NVIDIA cuSPARSELt's 2:4 matmul;
- ``weight_cache``: copies derived from a stored weight (dense, packed),
  made once per weight state, and the cached dense-linear op.

Each op takes friendly arguments, checks them (a ValueError/TypeError naming
the argument) and runs under autograd and torch.compile.
"""

from . import weight_cache  # noqa: I001  (first: the matmul ops use it)
from .block_sparse_matmul import (
    BLOCK_SPARSE_DTYPES,
    BLOCK_SPARSE_INDEX_DTYPES,
    BLOCK_SPARSE_SIZES,
    BlockSparseStructure,
    block_sparse_matmul,
    block_sparse_structure,
    build_block_sparse_structure,
)
from .mask_compaction import bsr_transpose, compress_2to4, decompress_2to4, dense_to_bsr, keep_indices
from .patch_drop_attention import PATCH_DROP_DTYPES, PATCH_DROP_MAX_HEAD_DIM, patch_drop_attention
from .semi_structured_matmul import SEMI_STRUCTURED_DTYPES, semi_structured_matmul, semi_structured_values_grad
from . import cusparselt  # noqa: E402  (after semi_structured_matmul, whose gradient it shares)

__all__ = [
    "dense_to_bsr", "bsr_transpose", "compress_2to4", "decompress_2to4", "keep_indices",
    "block_sparse_matmul", "block_sparse_structure", "build_block_sparse_structure", "BlockSparseStructure",
    "BLOCK_SPARSE_DTYPES", "BLOCK_SPARSE_INDEX_DTYPES", "BLOCK_SPARSE_SIZES",
    "semi_structured_matmul", "semi_structured_values_grad", "SEMI_STRUCTURED_DTYPES",
    "patch_drop_attention", "PATCH_DROP_DTYPES", "PATCH_DROP_MAX_HEAD_DIM",
    "cusparselt", "weight_cache",
]
