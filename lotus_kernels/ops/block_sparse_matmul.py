"""Block-sparse matmul: y = act(x @ W^T + b) with W stored as BSR blocks (Triton kernels, forward and backward).

The op is ``torch.ops.lotus_kernels.block_sparse_matmul`` (plus ``_dx`` and
``_sdd`` for the backward), a custom op with a fake and autograd; its kernels
are ``lotus_kernels.kernels.block_sparse_matmul`` with ``block_sparse_matmul_ref``
beside them. SparseLinear(pattern="block") calls it through the "triton" backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._shared import ACTIVATIONS, KERNEL_DTYPES
from ..layouts import bsr_row_indices, bsr_transpose_structure, check_bsr_structure
from . import weight_cache
from ._common import CHECKED, check_on_device_of_x, check_tensor, grad_before_activation

# The kernels live in lotus_kernels/kernels/block_sparse_matmul.py and are
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
    from ..kernels import block_sparse_matmul

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
    (``layouts.check_bsr_structure``: ValueError/TypeError; one host sync).
    """
    bh, bw = block_shape
    check_bsr_structure(crow_indices, col_indices, out_features // bh, in_features // bw, op="block_sparse_structure")
    return build_block_sparse_structure(crow_indices, col_indices, out_features, in_features, (bh, bw))


def build_block_sparse_structure(crow_indices, col_indices, out_features, in_features, block_shape) -> BlockSparseStructure:
    """``block_sparse_structure`` without the check: for a triple already checked (one host sync saved)."""
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


def _block_sparse_matmul_backward(ctx, grad_y, grad_pre):
    x, values, col, crow_t, col_t, source_t, row_order_t, block_row, pre = ctx.saved_tensors
    grad = grad_before_activation("block_sparse_matmul", ctx.activation, grad_y, pre)
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
        structure = build_block_sparse_structure(crow_indices, col_indices, out_features, x.shape[-1], (bh, bw))
    else:
        if not isinstance(structure, BlockSparseStructure):
            raise TypeError(f"block_sparse_matmul: structure must be a BlockSparseStructure (from block_sparse_structure), got {type(structure).__name__}")
        check_on_device_of_x("block_sparse_matmul", x, {f"structure.{name}": t for name, t in zip(BlockSparseStructure._fields, structure)})
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
        expected = build_block_sparse_structure(crow, col, out_features, in_features, block)
        for name, got, want in zip(BlockSparseStructure._fields, structure, expected):
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                raise ValueError(
                    f"block_sparse_matmul: structure.{name} does not belong to crow_indices/col_indices "
                    f"(got {got.dtype} {tuple(got.shape)}); make it with block_sparse_structure(crow_indices, "
                    "col_indices, out_features, in_features, block_shape) and rebuild it whenever they change"
                )
        return CHECKED

    key = f"checked-bsr-structure-{out_features}x{in_features}-{block[0]}x{block[1]}"
    weight_cache.derived(key, crow, (col, *structure), check)






BLOCK_SPARSE_DTYPES = KERNEL_DTYPES
BLOCK_SPARSE_SIZES = (16, 32, 64, 128)
BLOCK_SPARSE_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_block_sparse_matmul_args(x, values, crow, col, out_features, bias, activation) -> None:
    for t, name in ((x, "x"), (values, "values"), (crow, "crow_indices"), (col, "col_indices")):
        check_tensor(t, name)
    if activation not in ACTIVATIONS:
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
        check_tensor(bias, "bias")
        if bias.shape != (out_features,) or bias.dtype != x.dtype:
            raise ValueError(f"block_sparse_matmul: bias must be [{out_features}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_on_device_of_x("block_sparse_matmul", x, {"values": values, "crow_indices": crow, "col_indices": col, "bias": bias})
