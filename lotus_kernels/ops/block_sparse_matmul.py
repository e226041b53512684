"""Custom ops over the compiled extension: ``torch.ops.lotus_kernels.*``.

Each op has one TORCH_LIBRARY schema (csrc/mask_compaction.cpp), a CPU and a
CUDA implementation, a fake implementation here (so it traces under
torch.compile; ``dense_to_bsr`` has a data-dependent nnz) and a pure-torch
reference in ``lotus_kernels.mask_compaction``. The functions below are the
public entry points: they accept the friendlier argument forms, check what the
kernels cannot know, and raise a clear error when the extension was not built
for the tensors' device.
"""

from __future__ import annotations

import math
import operator
import os
from typing import NamedTuple

import torch

from . import _extension, weight_cache
from .mask_compaction import (
    GROUPS_PER_META_WORD,
    bsr_row_indices,
    bsr_transpose_structure,
    check_2to4_metadata,
    check_bsr_structure,
    normalized_mask,
)
from .masks import block_shape, reduce_block_mask

__all__ = [
    "dense_to_bsr", "bsr_transpose", "compress_2to4", "decompress_2to4", "keep_indices",
    "block_sparse_matmul", "semi_structured_matmul", "patch_drop_attention",
]


def _op(name: str):
    return getattr(torch.ops.lotus_kernels, name)


def _tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_on_device_of_x(op: str, x: torch.Tensor, tensors: dict[str, torch.Tensor | None]) -> None:
    """ValueError naming the first tensor (None skipped) that is not on x's device.

    The kernels take raw pointers: a CPU index tensor handed to a CUDA launch
    fails far from its cause, or not at all under the interpreter.
    """
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; every tensor must be on x's device")


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
    weight, mask = _tensor(weight, "weight"), _tensor(mask, "mask")
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
    return _op("dense_to_bsr")(weight, mask, bh, bw)


def bsr_transpose(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, shape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSR triple of W [R, C] (shape=(R, C)) -> BSR triple of W^T [C, R].

    Blocks become [bw, bh], each transposed; within a block row they are
    sorted by column. The backward pass of a block-sparse matmul reads this.
    """
    for t, name in ((crow_indices, "crow_indices"), (col_indices, "col_indices"), (values, "values")):
        _tensor(t, name)
    rows, cols = _shape_pair("bsr_transpose", shape)
    _extension.require("bsr_transpose", values)
    return _op("bsr_transpose")(crow_indices, col_indices, values, rows, cols)


def _shape_pair(op: str, shape) -> tuple[int, int]:
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
    _tensor(weight, "weight")
    if mask is not None:
        _tensor(mask, "mask")
    _extension.require("compress_2to4", weight)
    return _op("compress_2to4")(weight, mask)


def decompress_2to4(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``compress_2to4``: values [R, C/2], metadata -> weight [R, C]."""
    _tensor(values, "values")
    _tensor(metadata, "metadata")
    _extension.require("decompress_2to4", values)
    return _op("decompress_2to4")(values, metadata)


def keep_indices(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep_mask [B, N] bool -> (indices [B, N] int32, counts [B] int32).

    indices[b, :counts[b]] are row b's kept positions, ascending; the rest are
    -1 (the shape stays static for torch.compile). The patch-dropping gather
    index: slice ``indices[:, :K]`` when every row keeps K.
    """
    _tensor(keep_mask, "keep_mask")
    _extension.require("keep_indices", keep_mask)
    return _op("keep_indices")(keep_mask)


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


# ---------------------------------------------------------------------------
# block-sparse matmul (Triton): custom ops with fakes and autograd
# ---------------------------------------------------------------------------
# The kernels live in lotus_kernels/triton/block_sparse_matmul.py and are
# imported when an op first runs, so importing lotus_kernels does not import
# triton. Structure tensors (the BSR triple, its transpose and block rows) are
# computed once per sparsity structure by the caller (SparseLinear keeps them
# as buffers), never per call.
#
# Validation. The kernels trust every index they read: a column past the
# weight, a row pointer past nnz or a launch order past the block rows reads
# and writes out of bounds (a segfault under the interpreter). So a structure
# is checked (one host sync) when it is made, and the triple a call receives
# is checked once per index state: the check is remembered against the
# tensors' identity and version counters (weight_cache.derived), so repeated
# calls with one structure cost nothing, and an in-place change or a new
# tensor (.to(), load_state_dict) is checked again on its next call. Under
# torch.compile the tensors are trusted (checking there would bake one answer
# into the graph): SparseLinear checks its layout whenever it is set or loaded.


def _bsr_kernels():
    from .triton import block_sparse_matmul

    return block_sparse_matmul


class BlockSparseStructure(NamedTuple):
    """Index tensors the block-sparse kernels walk besides the BSR triple (int64, computed once per structure).

    row_order [R/bh]: block rows, most stored blocks first (launch order);
    crow_t [C/bw + 1], col_t [nnz], source_t [nnz]: W^T's structure, source_t
    indexing W's values; row_order_t [C/bw]: its launch order; block_row
    [nnz]: each stored block's block row (for dW).
    """

    row_order: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    source_t: torch.Tensor
    row_order_t: torch.Tensor
    block_row: torch.Tensor


def block_sparse_structure(crow_indices, col_indices, out_features: int, in_features: int, block_shape) -> BlockSparseStructure:
    """The ``BlockSparseStructure`` of a BSR weight [out_features, in_features] with blocks block_shape (pure torch).

    Checks that (crow_indices, col_indices) is a valid BSR structure first
    (``mask_compaction.check_bsr_structure``: ValueError/TypeError; one host sync).
    """
    bh, bw = block_shape
    check_bsr_structure(crow_indices, col_indices, out_features // bh, in_features // bw, op="block_sparse_structure")
    return _build_block_sparse_structure(crow_indices, col_indices, out_features, in_features, (bh, bw))


def _build_block_sparse_structure(crow_indices, col_indices, out_features, in_features, block_shape) -> BlockSparseStructure:
    bh, bw = block_shape
    crow_t, col_t, source_t = bsr_transpose_structure(crow_indices, col_indices, out_features // bh, in_features // bw)
    return BlockSparseStructure(
        row_order=_block_row_order(crow_indices),
        crow_t=crow_t,
        col_t=col_t,
        source_t=source_t,
        row_order_t=_block_row_order(crow_t),
        block_row=bsr_row_indices(crow_indices, col_indices.numel()),
    )


def _block_row_order(crow: torch.Tensor) -> torch.Tensor:
    # Longest block rows launch first; stable, so equal rows keep their order.
    return torch.argsort(crow.diff(), descending=True, stable=True)


@torch.library.custom_op("lotus_kernels::block_sparse_matmul", mutates_args=())
def _block_sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    row_order: torch.Tensor,
    crow_t: torch.Tensor,
    col_t: torch.Tensor,
    source_t: torch.Tensor,
    row_order_t: torch.Tensor,
    block_row: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    activation: str,
    store_pre_activation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, pre = _bsr_kernels().bsr_matmul(
        x, values, crow_indices, col_indices, out_features,
        row_order=row_order, bias=bias, activation=activation, store_pre_activation=store_pre_activation,
    )
    return y, pre if pre is not None else x.new_empty(0)


@_block_sparse_matmul.register_fake
def _(x, values, crow_indices, col_indices, row_order, crow_t, col_t, source_t, row_order_t, block_row, bias, out_features, activation, store_pre_activation):
    y = x.new_empty((x.shape[0], out_features))
    return y, x.new_empty((x.shape[0], out_features) if store_pre_activation else (0,))


@torch.library.custom_op("lotus_kernels::block_sparse_matmul_dx", mutates_args=())
def _block_sparse_matmul_dx(
    grad: torch.Tensor, values: torch.Tensor, crow_t: torch.Tensor, col_t: torch.Tensor, source_t: torch.Tensor,
    row_order_t: torch.Tensor, in_features: int,
) -> torch.Tensor:
    return _bsr_kernels().bsr_matmul(grad, values, crow_t, col_t, in_features, row_order=row_order_t, source=source_t)[0]


@_block_sparse_matmul_dx.register_fake
def _(grad, values, crow_t, col_t, source_t, row_order_t, in_features):
    return grad.new_empty((grad.shape[0], in_features))


@torch.library.custom_op("lotus_kernels::block_sparse_sdd", mutates_args=())
def _block_sparse_sdd(grad: torch.Tensor, x: torch.Tensor, block_row: torch.Tensor, col_indices: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    return _bsr_kernels().bsr_sdd(grad, x, block_row, col_indices, (block_rows, block_cols))


@_block_sparse_sdd.register_fake
def _(grad, x, block_row, col_indices, block_rows, block_cols):
    return x.new_empty((col_indices.shape[0], block_rows, block_cols))


def _block_sparse_matmul_setup(ctx, inputs, output):
    x, values, crow, col, row_order, crow_t, col_t, source_t, row_order_t, block_row, bias, _, activation, _ = inputs
    ctx.save_for_backward(x, values, col, crow_t, col_t, source_t, row_order_t, block_row, output[1])
    ctx.activation, ctx.has_bias = activation, bias is not None


def _grad_before_activation(op: str, activation: str, grad_y: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. the pre-activation (x @ W^T + b), contiguous, for the kernels' backward."""
    if activation == "gelu":
        if pre.numel() == 0:
            raise RuntimeError(f"{op}: GELU backward needs the pre-activation (store_pre_activation=True)")
        # d gelu(z)/dz for the exact GELU, in fp32.
        z = pre.float()
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        grad_y = (grad_y.float() * (cdf + z * pdf)).to(grad_y.dtype)
    return grad_y.contiguous()


def _block_sparse_matmul_backward(ctx, grad_y, grad_pre):
    x, values, col, crow_t, col_t, source_t, row_order_t, block_row, pre = ctx.saved_tensors
    grad = _grad_before_activation("block_sparse_matmul", ctx.activation, grad_y, pre)
    _, bh, bw = values.shape
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _block_sparse_matmul_dx(grad, values, crow_t, col_t, source_t, row_order_t, x.shape[1])
    if ctx.needs_input_grad[1]:
        grad_values = _block_sparse_sdd(grad, x, block_row, col, bh, bw)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return (grad_x, grad_values) + (None,) * 8 + (grad_bias, None, None, None)


_block_sparse_matmul.register_autograd(_block_sparse_matmul_backward, setup_context=_block_sparse_matmul_setup)


def block_sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    *,
    structure: BlockSparseStructure | None = None,
) -> torch.Tensor:
    """act(x @ W^T + bias) with W [out_features, K] as the BSR triple (Triton kernels, forward and backward).

    x [..., K] (any leading dims and strides; fp16, bf16 or fp32), values
    [nnz, bh, bw] with bh, bw in {16, 32, 64, 128}, int64 (or int32) crow/col, bias
    [out_features] or None, activation "none" | "gelu" -> [..., out_features].
    Gradients flow to x, the stored blocks only, and bias.
    structure: from ``block_sparse_structure``; computed here when not given
    (pass it when calling repeatedly with one structure, as SparseLinear does).
    The triple is checked (ValueError: row pointer, column range, a column
    twice in a row; ``structure`` not made from these indices) on the first
    call with each index state, and trusted under torch.compile (see
    "Validation" above).
    """
    _check_block_sparse_matmul_args(x, values, crow_indices, col_indices, out_features, bias, activation)
    bh, bw = values.shape[1:]
    block_cols = x.shape[-1] // bw
    cols_hint = f"x's last dim {x.shape[-1]} holds only {block_cols} blocks of width {bw}"
    if structure is None:
        # One-off path (host syncs): the whole triple is checked, then its structure built.
        check_bsr_structure(crow_indices, col_indices, out_features // bh, block_cols, op="block_sparse_matmul", cols_hint=cols_hint)
        structure = _build_block_sparse_structure(crow_indices, col_indices, out_features, x.shape[-1], (bh, bw))
    else:
        if not isinstance(structure, BlockSparseStructure):
            raise TypeError(f"block_sparse_matmul: structure must be a BlockSparseStructure (from block_sparse_structure), got {type(structure).__name__}")
        _check_on_device_of_x("block_sparse_matmul", x, {f"structure.{name}": t for name, t in zip(BlockSparseStructure._fields, structure)})
        if structure.crow_t.shape != (block_cols + 1,):
            # The transposed row pointer has one entry per block column of W: it fixes in_features.
            raise ValueError(
                f"block_sparse_matmul: x's last dim {x.shape[-1]} does not match the weight's in_features "
                f"{(structure.crow_t.shape[0] - 1) * values.shape[2]}"
            )
        if not torch.compiler.is_compiling():
            _check_structure_once(crow_indices, col_indices, structure, out_features, x.shape[-1], (bh, bw), cols_hint)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    store_pre = activation == "gelu" and torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    y, _ = _block_sparse_matmul(x2, values, crow_indices, col_indices, *structure, bias, out_features, activation, store_pre)
    return y.reshape(*lead, out_features)


def _check_structure_once(crow, col, structure, out_features, in_features, block, cols_hint) -> None:
    """The triple is valid and ``structure`` is exactly its block_sparse_structure; remembered per index state."""

    def check() -> torch.Tensor:
        check_bsr_structure(crow, col, out_features // block[0], in_features // block[1], op="block_sparse_matmul", cols_hint=cols_hint)
        expected = _build_block_sparse_structure(crow, col, out_features, in_features, block)
        for name, got, want in zip(BlockSparseStructure._fields, structure, expected):
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                raise ValueError(
                    f"block_sparse_matmul: structure.{name} does not belong to crow_indices/col_indices "
                    f"(got {got.dtype} {tuple(got.shape)}); make it with block_sparse_structure(crow_indices, "
                    "col_indices, out_features, in_features, block_shape) and rebuild it whenever they change"
                )
        return _CHECKED

    key = f"checked-bsr-structure-{out_features}x{in_features}-{block[0]}x{block[1]}"
    weight_cache.derived(key, crow, (col, *structure), check)


def _check_metadata_once(metadata: torch.Tensor, in_features: int) -> None:
    def check() -> torch.Tensor:
        check_2to4_metadata(metadata, in_features, op="semi_structured_matmul")
        return _CHECKED

    weight_cache.derived(f"checked-2:4-metadata-{in_features}", metadata, (), check)


# What weight_cache remembers for a check that passed: nothing but the fact.
_CHECKED = torch.empty(0)


BLOCK_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SPARSE_SIZES = (16, 32, 64, 128)
BLOCK_SPARSE_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_block_sparse_matmul_args(x, values, crow, col, out_features, bias, activation) -> None:
    for t, name in ((x, "x"), (values, "values"), (crow, "crow_indices"), (col, "col_indices")):
        _tensor(t, name)
    if activation not in ("none", "gelu"):
        raise ValueError(f"block_sparse_matmul: activation must be 'none' or 'gelu', got {activation!r}")
    if x.dtype not in BLOCK_SPARSE_DTYPES or values.dtype != x.dtype:
        raise TypeError(f"block_sparse_matmul: x and values must share a dtype in {BLOCK_SPARSE_DTYPES}, got {x.dtype} and {values.dtype}")
    if values.dim() != 3 or values.shape[1] not in BLOCK_SPARSE_SIZES or values.shape[2] not in BLOCK_SPARSE_SIZES:
        raise ValueError(f"block_sparse_matmul: values must be [nnz, bh, bw] with bh, bw in {BLOCK_SPARSE_SIZES}, got {tuple(values.shape)}")
    bh, bw = values.shape[1:]
    if x.dim() == 0 or x.shape[-1] % bw or out_features % bh:
        raise ValueError(f"block_sparse_matmul: x last dim {x.shape[-1] if x.dim() else None} and out_features {out_features} must be multiples of the block ({bh}, {bw})")
    if crow.shape != (out_features // bh + 1,) or col.shape != (values.shape[0],):
        raise ValueError(f"block_sparse_matmul: crow_indices must be [{out_features // bh + 1}] and col_indices [{values.shape[0]}], got {tuple(crow.shape)} and {tuple(col.shape)}")
    if crow.dtype not in BLOCK_SPARSE_INDEX_DTYPES or col.dtype not in BLOCK_SPARSE_INDEX_DTYPES:
        raise TypeError(f"block_sparse_matmul: crow_indices and col_indices must be int32 or int64, got {crow.dtype} and {col.dtype}")
    if bias is not None:
        _tensor(bias, "bias")
        if bias.shape != (out_features,) or bias.dtype != x.dtype:
            raise ValueError(f"block_sparse_matmul: bias must be [{out_features}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    _check_on_device_of_x("block_sparse_matmul", x, {"values": values, "crow_indices": crow, "col_indices": col, "bias": bias})


# ---------------------------------------------------------------------------
# 2:4 semi-structured matmul (Triton): custom ops with fakes and autograd
# ---------------------------------------------------------------------------


def _ss_kernels():
    from .triton import semi_structured_matmul

    return semi_structured_matmul


@torch.library.custom_op("lotus_kernels::semi_structured_matmul", mutates_args=())
def _semi_structured_matmul(
    x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None, activation: str, store_pre_activation: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    y, pre = _ss_kernels().ss_matmul(x, values, metadata, bias=bias, activation=activation, store_pre_activation=store_pre_activation)
    return y, pre if pre is not None else x.new_empty(0)


@_semi_structured_matmul.register_fake
def _(x, values, metadata, bias, activation, store_pre_activation):
    shape = (x.shape[0], values.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_pre_activation else (0,))


@torch.library.custom_op("lotus_kernels::semi_structured_matmul_dx", mutates_args=())
def _semi_structured_matmul_dx(grad: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, in_features: int) -> torch.Tensor:
    return _ss_kernels().ss_matmul_dx(grad, values, metadata, in_features)


@_semi_structured_matmul_dx.register_fake
def _(grad, values, metadata, in_features):
    return grad.new_empty((grad.shape[0], in_features))


def _semi_structured_setup(ctx, inputs, output):
    x, values, metadata, bias, activation, _ = inputs
    ctx.save_for_backward(x, values, metadata, output[1])
    ctx.activation, ctx.has_bias = activation, bias is not None


def _semi_structured_backward(ctx, grad_y, grad_pre):
    x, values, metadata, pre = ctx.saved_tensors
    grad = _grad_before_activation("semi_structured_matmul", ctx.activation, grad_y, pre)
    n, half = values.shape
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _semi_structured_matmul_dx(grad, values, metadata, x.shape[1])
    if ctx.needs_input_grad[1]:
        grad_values = semi_structured_values_grad(grad, x, metadata)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return grad_x, grad_values, None, grad_bias, None, None


def semi_structured_values_grad(grad: torch.Tensor, x: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """Gradient of the compressed 2:4 values: grad [M, N], x [M, K] -> [N, K/2].

    dW dense (one cuBLAS matmul), then only the kept slots are read out:
    pruned positions never get gradient. Shared by every 2:4 backend.
    """
    from .mask_compaction import unpack_2to4_slots

    n, k = grad.shape[1], x.shape[1]
    dense = (grad.t() @ x).view(n, k // 4, 4)
    return dense.gather(-1, unpack_2to4_slots(metadata, k)).reshape(n, k // 2)


_semi_structured_matmul.register_autograd(_semi_structured_backward, setup_context=_semi_structured_setup)


def semi_structured_matmul(
    x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """act(x @ W^T + bias) with W [N, K] as compress_2to4's (values [N, K/2], metadata) (Triton, forward and backward).

    x [..., K] (fp16, bf16 or fp32, any strides), bias [N] or None,
    activation "none" | "gelu" -> [..., N]. Gradients flow to x, the kept
    values only, and bias.
    metadata must code two ascending slots per group (what compress_2to4
    writes): checked on the first call with each metadata tensor and again
    after it changes in place (ValueError naming the first bad group; one
    host sync), trusted under torch.compile.
    """
    for t, name in ((x, "x"), (values, "values"), (metadata, "metadata")):
        _tensor(t, name)
    if activation not in ("none", "gelu"):
        raise ValueError(f"semi_structured_matmul: activation must be 'none' or 'gelu', got {activation!r}")
    if x.dtype not in BLOCK_SPARSE_DTYPES or values.dtype != x.dtype:
        raise TypeError(f"semi_structured_matmul: x and values must share a dtype in {BLOCK_SPARSE_DTYPES}, got {x.dtype} and {values.dtype}")
    if metadata.dtype != torch.int32:
        raise TypeError(f"semi_structured_matmul: metadata must be int32, got {metadata.dtype}")
    k = x.shape[-1] if x.dim() else None
    n = values.shape[0] if values.dim() == 2 else None
    if k is None or k % 4 or values.dim() != 2 or values.shape[1] * 2 != k:
        raise ValueError(f"semi_structured_matmul: x [..., K] with K % 4 == 0 needs values [N, K/2]; got x {tuple(x.shape)}, values {tuple(values.shape)}")
    if metadata.shape != (n, -(-(k // 4) // GROUPS_PER_META_WORD)):
        raise ValueError(f"semi_structured_matmul: metadata must be [{n}, {-(-(k // 4) // GROUPS_PER_META_WORD)}], got {tuple(metadata.shape)}")
    if bias is not None:
        _tensor(bias, "bias")
        if bias.shape != (n,) or bias.dtype != x.dtype:
            raise ValueError(f"semi_structured_matmul: bias must be [{n}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    _check_on_device_of_x("semi_structured_matmul", x, {"values": values, "metadata": metadata, "bias": bias})
    if not torch.compiler.is_compiling():
        # A code with i0 >= i1 would place two values in one slot (y silently wrong). Checked
        # once per metadata state, as the block structure is (see "Validation" above).
        _check_metadata_once(metadata, k)
    lead = x.shape[:-1]
    store_pre = activation == "gelu" and torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    y, _ = _semi_structured_matmul(x.reshape(-1, k), values, metadata, bias, activation, store_pre)
    return y.reshape(*lead, n)


# ---------------------------------------------------------------------------
# patch-dropping attention (Triton): custom ops with fakes and autograd
# ---------------------------------------------------------------------------
# qkv travels as the 5-d view [B, N, 3, H, D] of timm's fused projection
# (no copy); keep_idx is [B, K] int32 with trailing -1 padding, or empty for
# "every token" (the kernels then skip the index loads); counts [B] int32
# holds each row's valid entries.


def _pda_kernels():
    from .triton import patch_drop_attention

    return patch_drop_attention


def _pda_index(keep_idx: torch.Tensor) -> torch.Tensor | None:
    return None if keep_idx.numel() == 0 else keep_idx


@torch.library.custom_op("lotus_kernels::patch_drop_attention", mutates_args=())
def _patch_drop_attention(
    qkv: torch.Tensor, keep_idx: torch.Tensor, counts: torch.Tensor, scale: float, num_prefix_tokens: int, return_cls: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _pda_kernels().pda_forward(qkv, _pda_index(keep_idx), counts, scale, num_prefix_tokens, return_cls)


@_patch_drop_attention.register_fake
def _(qkv, keep_idx, counts, scale, num_prefix_tokens, return_cls):
    b, n, _, h, d = qkv.shape
    k = n if keep_idx.numel() == 0 else keep_idx.shape[1]
    stats = dict(dtype=torch.float32)
    return qkv.new_empty((b, k, h, d)), qkv.new_empty((b, h, k), **stats), qkv.new_empty((b, h, k) if return_cls else (0,), **stats)


@torch.library.custom_op("lotus_kernels::patch_drop_attention_backward", mutates_args=())
def _patch_drop_attention_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, keep_idx: torch.Tensor, counts: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    return _pda_kernels().pda_backward(grad_out, qkv, _pda_index(keep_idx), counts, out, lse, scale)


@_patch_drop_attention_backward.register_fake
def _(grad_out, qkv, keep_idx, counts, out, lse, scale):
    return qkv.new_empty(qkv.shape)


def _pda_setup(ctx, inputs, output):
    qkv, keep_idx, counts, scale, _, _ = inputs
    out, lse, cls = output
    ctx.save_for_backward(qkv, keep_idx, counts, out, lse)
    ctx.scale = scale
    # The log-sum-exp and the CLS attention are statistics, not part of the
    # differentiable output (the selectors take a top-k of them).
    ctx.mark_non_differentiable(lse, cls)


def _pda_backward(ctx, grad_out, grad_lse, grad_cls):
    qkv, keep_idx, counts, out, lse = ctx.saved_tensors
    grad_qkv = _patch_drop_attention_backward(grad_out, qkv, keep_idx, counts, out, lse, ctx.scale)
    return grad_qkv, None, None, None, None, None


_patch_drop_attention.register_autograd(_pda_backward, setup_context=_pda_setup)

PATCH_DROP_BACKENDS = ("auto", "triton", "sdpa", "reference")
PATCH_DROP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATCH_DROP_MAX_HEAD_DIM = 256


def patch_drop_attention(
    qkv: torch.Tensor,
    keep_idx: torch.Tensor | None,
    num_heads: int,
    scale: float | None = None,
    return_cls_attention: bool = False,
    *,
    num_prefix_tokens: int = 1,
    backend: str = "auto",
    validate: bool = True,
    padded: bool | None = None,
):
    """Attention among the kept tokens only, gathered from timm's fused qkv inside the kernel.

    qkv [B, N, 3*H*D] (timm Attention's ``qkv(x)``) or [B, N, 3, H, D], fp16,
    bf16 or fp32, any strides. keep_idx [B, K] int32/int64: each row's kept
    token positions, starting with the prefix tokens 0..num_prefix_tokens-1
    (the CLS token), patches in any order, no duplicates; a row keeping fewer
    tokens is padded with trailing -1 (K may be 1..N). None keeps all N.
    scale: softmax scale, default D**-0.5.

    Returns out [B, K, H*D] in qkv's dtype (ready for the proj layer; zeros at
    padded rows), and with return_cls_attention also cls [B, K - num_prefix]
    fp32: kept row 0's attention probabilities over the kept patches,
    averaged over heads (no gradient flows through it).
    Gradients reach qkv at the kept tokens only (dropped tokens get zeros).

    backend: "triton" (fused gather + flash kernels, CUDA or the interpreter),
    "sdpa" (gather copy + torch's scaled_dot_product_attention), "reference"
    (gather + fp32 softmax attention), "auto" (triton on CUDA, sdpa
    elsewhere). validate checks keep_idx's values (one host sync); it is
    skipped while torch.compile traces. padded: whether keep_idx has -1
    padding; None finds out (the sdpa backend then syncs once; under
    torch.compile it assumes padding), False is the caller's promise that
    every row keeps K tokens (SDPA then runs without a mask, on its flash path).
    """
    qkv5, keep_idx, scale = _check_patch_drop_args(qkv, keep_idx, num_heads, scale, num_prefix_tokens, backend, return_cls_attention)
    if validate and not torch.compiler.is_compiling():
        _check_keep_values(keep_idx, qkv5.shape[1], num_prefix_tokens)
    backend = _patch_drop_backend(backend, qkv5)
    b, n, _, h, d = qkv5.shape
    if backend == "reference":
        return _pda_kernels().patch_drop_attention_ref(qkv5, keep_idx, h, scale, return_cls_attention, num_prefix_tokens)
    if backend == "sdpa":
        return _patch_drop_attention_sdpa(qkv5, keep_idx, scale, return_cls_attention, num_prefix_tokens, padded)
    if keep_idx is None:
        index, counts = qkv5.new_empty(0, dtype=torch.int32), torch.full((b,), n, dtype=torch.int32, device=qkv5.device)
    else:
        index = keep_idx.to(torch.int32)
        counts = (index >= 0).sum(1, dtype=torch.int32)
    out, _, cls = _patch_drop_attention(qkv5, index, counts, float(scale), num_prefix_tokens, return_cls_attention)
    out = out.reshape(b, out.shape[1], h * d)
    if not return_cls_attention:
        return out
    return out, cls[:, :, num_prefix_tokens:].mean(1)


def _patch_drop_attention_sdpa(qkv5, keep_idx, scale, return_cls, num_prefix, padded):
    """The unfused baseline: gather q/k/v (a copy), then torch's SDPA; the CLS row from one extra query row."""
    import torch.nn.functional as F

    b, n, _, h, d = qkv5.shape
    if padded is None and keep_idx is not None:
        padded = True if torch.compiler.is_compiling() else bool((keep_idx < 0).any())
    if keep_idx is None:
        kept, valid = qkv5, None
    else:
        valid = keep_idx >= 0 if padded else None
        index = keep_idx.clamp_min(0).long()[:, :, None, None, None].expand(-1, -1, 3, h, d)
        kept = qkv5.gather(1, index)
    q, k, v = kept.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, K, D]
    mask = None if valid is None else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    if mask is not None:
        out = out.masked_fill(~valid[:, :, None, None], 0)
    out = out.reshape(b, -1, h * d)
    if not return_cls:
        return out
    with torch.no_grad():
        scores = (q[:, :, :1].float() @ k.float().transpose(-1, -2)).squeeze(2) * scale  # [B, H, K]
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        cls = scores.softmax(-1)[:, :, num_prefix:].mean(1)
        if valid is not None:
            cls = cls.masked_fill(~valid[:, num_prefix:], 0)
    return out, cls


def _check_patch_drop_args(qkv, keep_idx, num_heads, scale, num_prefix, backend, return_cls):
    _tensor(qkv, "qkv")
    if backend not in PATCH_DROP_BACKENDS:
        raise ValueError(f"patch_drop_attention: backend must be one of {PATCH_DROP_BACKENDS}, got {backend!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"patch_drop_attention: num_heads must be a positive int, got {num_heads!r}")
    if qkv.dtype not in PATCH_DROP_DTYPES:
        raise TypeError(f"patch_drop_attention: qkv must be one of {PATCH_DROP_DTYPES}, got {qkv.dtype}")
    if qkv.dim() == 3 and qkv.shape[2] % (3 * num_heads) == 0 and qkv.shape[2] > 0:
        qkv5 = qkv.unflatten(2, (3, num_heads, qkv.shape[2] // (3 * num_heads)))
    elif qkv.dim() == 5 and qkv.shape[2] == 3 and qkv.shape[3] == num_heads and qkv.shape[4] > 0:
        qkv5 = qkv
    else:
        raise ValueError(
            f"patch_drop_attention: qkv must be [B, N, 3*H*D] or [B, N, 3, H, D] with H = num_heads = {num_heads}, "
            f"got {tuple(qkv.shape)}"
        )
    b, n, _, _, d = qkv5.shape
    if d > PATCH_DROP_MAX_HEAD_DIM:
        raise ValueError(f"patch_drop_attention: head_dim must be at most {PATCH_DROP_MAX_HEAD_DIM}, got {d}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or not 0 <= num_prefix <= n:
        raise ValueError(f"patch_drop_attention: num_prefix_tokens must be an int in [0, {n}], got {num_prefix!r}")
    if return_cls and num_prefix < 1:
        raise ValueError("patch_drop_attention: return_cls_attention needs a CLS token (num_prefix_tokens >= 1)")
    scale = d**-0.5 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"patch_drop_attention: scale must be a positive finite number, got {scale!r}")
    if keep_idx is not None:
        _tensor(keep_idx, "keep_idx")
        if keep_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"patch_drop_attention: keep_idx must be int32 or int64, got {keep_idx.dtype}")
        if keep_idx.dim() != 2 or keep_idx.shape[0] != b or not 1 <= keep_idx.shape[1] <= n:
            raise ValueError(f"patch_drop_attention: keep_idx must be [B={b}, K] with 1 <= K <= N={n}, got {tuple(keep_idx.shape)}")
        if keep_idx.device != qkv.device:
            raise ValueError(f"patch_drop_attention: keep_idx is on {keep_idx.device} but qkv on {qkv.device}")
    return qkv5, keep_idx, float(scale)


def _check_keep_values(keep_idx: torch.Tensor | None, n: int, num_prefix: int) -> None:
    """Row rules the kernels rely on: prefix first, patches in range and unique, -1 only as trailing padding."""
    if keep_idx is None or keep_idx.numel() == 0:
        return
    idx = keep_idx.long()
    bad_negative = idx < -1
    if bool(bad_negative.any()):
        row, col = (int(v) for v in bad_negative.nonzero()[0])
        raise ValueError(f"keep_idx: index {int(idx[row, col])} at [{row}, {col}] is negative (only -1 pads a row)")
    valid = idx >= 0
    k = idx.shape[1]
    counts = valid.sum(1)
    padded_ok = valid == (torch.arange(k, device=idx.device) < counts[:, None])
    if not bool(padded_ok.all()):
        row = int((~padded_ok).any(1).nonzero()[0])
        raise ValueError(f"keep_idx: row {row} has -1 padding before a kept index ({idx[row].tolist()}); pad only at the end")
    too_big = idx >= n
    if bool(too_big.any()):
        row, col = (int(v) for v in too_big.nonzero()[0])
        raise ValueError(f"keep_idx: index {int(idx[row, col])} at [{row}, {col}] is out of range for N={n} tokens")
    p = min(num_prefix, k)
    prefix = torch.arange(p, device=idx.device)
    if p and not bool((idx[:, :p] == prefix).all()):
        row = int((idx[:, :p] != prefix).any(1).nonzero()[0])
        raise ValueError(
            f"keep_idx: every row must start with the {num_prefix} prefix token(s) {prefix.tolist()} (the CLS token is "
            f"always kept), row {row} starts with {idx[row, :p].tolist()}"
        )
    if bool((counts < max(1, min(num_prefix, k))).any()):
        row = int((counts < max(1, min(num_prefix, k))).nonzero()[0])
        raise ValueError(f"keep_idx: row {row} keeps no token")
    sorted_idx = idx.masked_fill(~valid, -1).sort(1).values
    dup = (sorted_idx[:, 1:] == sorted_idx[:, :-1]) & (sorted_idx[:, 1:] >= 0)
    if bool(dup.any()):
        row, col = (int(v) for v in dup.nonzero()[0])
        raise ValueError(f"keep_idx: row {row} keeps token {int(sorted_idx[row, col + 1])} twice; indices must be unique")


def _patch_drop_backend(backend: str, qkv5: torch.Tensor) -> str:
    if backend == "auto":
        # On CPU the Triton kernel is the interpreter (a test vehicle, slow): by name only.
        return "triton" if qkv5.is_cuda else "sdpa"
    if backend == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and qkv5.device.type == "cpu"
        if not (qkv5.is_cuda or interpreted):
            raise ValueError(
                f"patch_drop_attention: backend 'triton' needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got a {qkv5.device.type} tensor"
            )
        if interpreted and qkv5.dtype == torch.bfloat16:
            raise TypeError("patch_drop_attention: the Triton interpreter mishandles bfloat16; use fp16/fp32 on CPU")
    return backend
