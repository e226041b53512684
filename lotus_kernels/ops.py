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
from typing import NamedTuple

import torch

from . import _extension
from .mask_compaction import GROUPS_PER_META_WORD, bsr_row_indices, bsr_transpose_structure
from .masks import block_shape, reduce_block_mask

__all__ = ["dense_to_bsr", "bsr_transpose", "compress_2to4", "decompress_2to4", "keep_indices"]


def _op(name: str):
    return getattr(torch.ops.lotus_kernels, name)


def _tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


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
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2):
        raise TypeError(f"bsr_transpose: shape must be a (rows, cols) pair, got {shape!r}")
    _extension.require("bsr_transpose", values)
    return _op("bsr_transpose")(crow_indices, col_indices, values, int(shape[0]), int(shape[1]))


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
    """The ``BlockSparseStructure`` of a BSR weight [out_features, in_features] with blocks block_shape (pure torch)."""
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
    [nnz, bh, bw] with bh, bw in {16, 32, 64, 128}, int64 crow/col, bias
    [out_features] or None, activation "none" | "gelu" -> [..., out_features].
    Gradients flow to x, the stored blocks only, and bias.
    structure: from ``block_sparse_structure``; computed here when not given
    (pass it when calling repeatedly with one structure, as SparseLinear does).
    """
    _check_block_sparse_matmul_args(x, values, crow_indices, col_indices, out_features, bias, activation)
    block_cols = x.shape[-1] // values.shape[2]
    if structure is None:
        # One-off path (a host sync): a column past x's width would read out of bounds.
        if col_indices.numel() and int(col_indices.max()) >= block_cols:
            raise ValueError(
                f"block_sparse_matmul: the weight has block columns up to {int(col_indices.max())} but x's last dim "
                f"{x.shape[-1]} holds only {block_cols} blocks of width {values.shape[2]}"
            )
        structure = block_sparse_structure(crow_indices, col_indices, out_features, x.shape[-1], values.shape[1:])
    elif structure.crow_t.shape != (block_cols + 1,):
        # The transposed row pointer has one entry per block column of W: it fixes in_features.
        raise ValueError(
            f"block_sparse_matmul: x's last dim {x.shape[-1]} does not match the weight's in_features "
            f"{(structure.crow_t.shape[0] - 1) * values.shape[2]}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    store_pre = activation == "gelu" and torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    y, _ = _block_sparse_matmul(x2, values, crow_indices, col_indices, *structure, bias, out_features, activation, store_pre)
    return y.reshape(*lead, out_features)


BLOCK_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SPARSE_SIZES = (16, 32, 64, 128)


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
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"block_sparse_matmul: bias must be [{out_features}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (x, values, crow, col)} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"block_sparse_matmul: all tensors must be on one device, got {sorted(map(str, devices))}")


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
    from .mask_compaction import unpack_2to4_slots

    x, values, metadata, pre = ctx.saved_tensors
    grad = _grad_before_activation("semi_structured_matmul", ctx.activation, grad_y, pre)
    n, half = values.shape
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _semi_structured_matmul_dx(grad, values, metadata, x.shape[1])
    if ctx.needs_input_grad[1]:
        # dW dense (cuBLAS), then only the kept slots: pruned positions never get gradient.
        dense = (grad.t() @ x).view(n, half // 2, 4)
        grad_values = dense.gather(-1, unpack_2to4_slots(metadata, 2 * half)).reshape(n, half)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return grad_x, grad_values, None, grad_bias, None, None


_semi_structured_matmul.register_autograd(_semi_structured_backward, setup_context=_semi_structured_setup)


def semi_structured_matmul(
    x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """act(x @ W^T + bias) with W [N, K] as compress_2to4's (values [N, K/2], metadata) (Triton, forward and backward).

    x [..., K] (fp16, bf16 or fp32, any strides), bias [N] or None,
    activation "none" | "gelu" -> [..., N]. Gradients flow to x, the kept
    values only, and bias.
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
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"semi_structured_matmul: bias must be [{n}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (x, values, metadata)} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"semi_structured_matmul: all tensors must be on one device, got {sorted(map(str, devices))}")
    lead = x.shape[:-1]
    store_pre = activation == "gelu" and torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    y, _ = _semi_structured_matmul(x.reshape(-1, k), values, metadata, bias, activation, store_pre)
    return y.reshape(*lead, n)
