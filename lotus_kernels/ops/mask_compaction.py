"""The compaction ops of the compiled extension: mask -> layout, at C++/CUDA speed.

``dense_to_bsr``, ``bsr_transpose``, ``compress_2to4``, ``decompress_2to4``
and ``keep_indices`` are ``torch.ops.lotus_kernels.*``: one TORCH_LIBRARY
schema each (csrc/mask_compaction.cpp), a CPU and a CUDA implementation, a
fake implementation here (so they trace under torch.compile; ``dense_to_bsr``
has a data-dependent nnz) and a pure-torch ``*_ref`` in
``lotus_kernels.layouts``. The functions below are the public entry points:
they accept the friendlier argument forms, check what the kernels cannot know,
and raise a clear error when the extension was not built for the tensors'
device.
"""

from __future__ import annotations

import operator

import torch

from .. import _extension
from ..layouts import GROUPS_PER_META_WORD, normalized_mask
from ..masks import block_shape, reduce_block_mask
from ._common import check_tensor, extension_op


def dense_to_bsr(
    weight: torch.Tensor, mask: torch.Tensor, block_size=32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSR triple of the masked weight.

    weight [R, C] floating; mask bool, either element-level [R, C] (a block is
    kept when any of its entries is; entries outside the mask are stored as
    zero) or block-level [R/bh, C/bw]; block_size int or (bh, bw).
    Returns (crow_indices [R/bh+1] int64, col_indices [nnz] int64,
    values [nnz, bh, bw] weight.dtype), identical to
    ``(weight * mask).to_sparse_bsr((bh, bw))`` whenever every kept block
    holds a nonzero. Kept all-zero blocks are stored too: the mask decides.
    """
    weight, mask = check_tensor(weight, "weight"), check_tensor(mask, "mask")
    bh, bw = block_shape(block_size)
    if mask.dtype != torch.bool:
        raise TypeError(f"dense_to_bsr: mask must be a bool tensor, got dtype {mask.dtype}")
    if weight.dim() == 2 and mask.shape == weight.shape:
        # Torch ops need 0/1 bytes (the block-level path is read by the C++ op, which needs nothing).
        mask = normalized_mask(mask)
        weight = weight.masked_fill(~mask.to(weight.device), 0)
        mask = reduce_block_mask(mask, (bh, bw), strict=False)
    elif weight.dim() == 2 and weight.shape[0] % bh == 0 and weight.shape[1] % bw == 0:
        expected = (weight.shape[0] // bh, weight.shape[1] // bw)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"dense_to_bsr: mask must be element-level {tuple(weight.shape)} or block-level "
                f"{expected}, got {tuple(mask.shape)}"
            )
    _extension.require("dense_to_bsr", weight, mask)
    return extension_op("dense_to_bsr")(weight, mask, bh, bw)


def bsr_transpose(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, shape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSR triple of W [R, C] (shape=(R, C)) -> BSR triple of W^T [C, R].

    Blocks become [bw, bh], each transposed; within a block row they are
    sorted by column. The backward pass of a block-sparse matmul reads this.
    """
    for t, name in ((crow_indices, "crow_indices"), (col_indices, "col_indices"), (values, "values")):
        check_tensor(t, name)
    rows, cols = shape_pair("bsr_transpose", shape)
    _extension.require("bsr_transpose", values)
    return extension_op("bsr_transpose")(crow_indices, col_indices, values, rows, cols)


def shape_pair(op: str, shape) -> tuple[int, int]:
    """(rows, cols) as ints: ints, numpy ints and SymInts pass; floats and bools are refused, never truncated.

    Values outside int64 are a ValueError here (the C++ op cannot take them);
    the op checks the rest (negative, divisibility, sizes).
    """
    pair = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if pair is None or len(pair) != 2 or any(isinstance(v, bool) or not hasattr(type(v), "__index__") for v in pair):
        raise TypeError(f"{op}: shape must be a (rows, cols) pair of ints, got {shape!r}")
    out = []
    for name, v in zip(("rows", "cols"), pair):
        if not isinstance(v, torch.SymInt):
            v = operator.index(v)
            if not -(2**63) <= v < 2**63:
                raise ValueError(f"{op}: {name} must be an int in [0, 2**63), got {v}")
        out.append(v)
    return out[0], out[1]


def compress_2to4(weight: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 weight [R, C] -> (values [R, C/2], metadata [R, ceil(C/32)] int32).

    Kept entries: the mask's (weights outside it are dropped), or the nonzero
    weights without a mask; a group of 4 with more than two raises ValueError.
    Metadata layout: see ``csrc/mask_compaction.h`` (eight 4-bit group codes
    per int32, two 2-bit slot indices per code, ascending).
    """
    check_tensor(weight, "weight")
    if mask is not None:
        check_tensor(mask, "mask")
    _extension.require("compress_2to4", weight)
    return extension_op("compress_2to4")(weight, mask)


def decompress_2to4(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``compress_2to4``: values [R, C/2], metadata -> weight [R, C]."""
    check_tensor(values, "values")
    check_tensor(metadata, "metadata")
    _extension.require("decompress_2to4", values)
    return extension_op("decompress_2to4")(values, metadata)


def keep_indices(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep_mask [B, N] bool -> (indices [B, N] int32, counts [B] int32).

    indices[b, :counts[b]] are row b's kept positions, ascending; the rest are
    -1 (the shape stays static for torch.compile). The patch-dropping gather
    index: slice ``indices[:, :K]`` when every row keeps K.
    """
    check_tensor(keep_mask, "keep_mask")
    _extension.require("keep_indices", keep_mask)
    return extension_op("keep_indices")(keep_mask)


# ---------------------------------------------------------------------------
# fake implementations (shapes only) for FakeTensor / torch.compile
# ---------------------------------------------------------------------------


def _register_fakes() -> None:
    @torch.library.register_fake("lotus_kernels::keep_indices")
    def _(keep_mask):
        rows, n = keep_mask.shape
        return keep_mask.new_empty((rows, n), dtype=torch.int32), keep_mask.new_empty((rows,), dtype=torch.int32)

    @torch.library.register_fake("lotus_kernels::dense_to_bsr")
    def _(weight, block_mask, block_rows, block_cols):
        nnz = torch.library.get_ctx().new_dynamic_size()
        index = dict(dtype=torch.int64, device=weight.device)
        return (
            torch.empty(weight.shape[0] // block_rows + 1, **index),
            torch.empty(nnz, **index),
            weight.new_empty((nnz, block_rows, block_cols)),
        )

    @torch.library.register_fake("lotus_kernels::bsr_transpose")
    def _(crow_indices, col_indices, values, rows, cols):
        nnz, bh, bw = values.shape
        return (
            crow_indices.new_empty((cols // bw + 1,)),
            col_indices.new_empty((nnz,)),
            values.new_empty((nnz, bw, bh)),
        )

    @torch.library.register_fake("lotus_kernels::compress_2to4")
    def _(weight, mask=None):
        rows, cols = weight.shape
        words = -(-(cols // 4) // GROUPS_PER_META_WORD)
        return weight.new_empty((rows, cols // 2)), weight.new_empty((rows, words), dtype=torch.int32)

    @torch.library.register_fake("lotus_kernels::decompress_2to4")
    def _(values, metadata):
        rows, half = values.shape
        return values.new_empty((rows, 2 * half))


if _extension.is_built():
    _register_fakes()
