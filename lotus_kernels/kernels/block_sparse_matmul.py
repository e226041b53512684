"""Block-sparse matmul: y = act(x @ W^T + bias) with W [N, K] stored as a BSR triple.

Kernels (one name everywhere: kernel, op, module backend, test, bench):
- ``_bsr_matmul_kernel``: each program owns BLOCK_M rows of x and one output
  block row, and walks only that block row's stored blocks (crow/col), so a
  pruned block costs nothing and an empty block row writes bias only. The
  same kernel computes dx = dy @ W by walking the transposed structure
  (``mask_compaction.bsr_transpose_structure``) and reading W's blocks transposed through an
  index indirection: no transposed copy of the values is ever made.
- ``_bsr_sdd_kernel`` (sampled dense-dense): dW only at stored blocks,
  dW[b] = dy[:, rows(b)]^T @ x[:, cols(b)], reduced over M by one program per
  block, or per (block, slice of M) when blocks are too few to fill the GPU
  (``sdd_splits``); pruned blocks never receive gradient.

Precision: fp16/bf16 inputs accumulate in fp32; fp32 inputs follow torch's
fp32 matmul setting (``_common.input_precision``): full fp32 by default, TF32
tensor cores after ``torch.set_float32_matmul_precision("high")``, as the
dense path does. Under TRITON_INTERPRET=1 the kernels run on CPU tensors
(fp32/fp16), which is how tests/ check them.

``block_sparse_matmul_ref`` is the pure-torch reference.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..layouts import bsr_to_dense_ref
from ._common import ACTIVATIONS, INTERPRET, autotune, bucket, gelu, input_precision, packed


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------


def block_sparse_matmul_ref(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """x [..., K] -> act(x @ W^T + bias) [..., N], W the dense form of the BSR triple (values [nnz, bh, bw])."""
    weight = bsr_to_dense_ref(crow_indices, col_indices, values, (out_features, x.shape[-1]))
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _accumulate_block(
    acc, b, x_ptr, values_ptr, col_ptr, source_ptr, offs_m, offs_in, offs_out, row_mask,
    stride_xm, stride_xk,
    BH: tl.constexpr, BW: tl.constexpr, IN_B: tl.constexpr, TRANSPOSED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """acc [BLOCK_M, OUT_B] += x[rows, block b's input columns] @ (block b)^T."""
    col = tl.load(col_ptr + b)
    if TRANSPOSED:
        src = tl.load(source_ptr + b)
    else:
        src = b
    x_tile = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + (col * IN_B + offs_in)[None, :] * stride_xk,
        mask=row_mask[:, None],
        other=0.0,
    )
    # We need the [IN_B, OUT_B] operand B^T of the block B = [OUT_B, IN_B].
    block = values_ptr + src.to(tl.int64) * (BH * BW)
    if TRANSPOSED:
        # B = values[src]^T, so B^T = values[src]: row-major [BH, BW] = [IN_B, OUT_B].
        w_t = tl.load(block + offs_in[:, None] * BW + offs_out[None, :])
    else:
        # B = values[src] [BH, BW]; read it transposed.
        w_t = tl.load(block + offs_out[None, :] * BW + offs_in[:, None])
    return tl.dot(x_tile, w_t, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _bsr_matmul_kernel(
    x_ptr, values_ptr, crow_ptr, col_ptr, source_ptr, row_order_ptr, bias_ptr, y_ptr, pre_ptr,
    M,
    stride_xm, stride_xk, stride_ym, stride_yn,
    M_BUCKET, N, K, NNZ_BUCKET,  # autotuning keys only
    BH: tl.constexpr, BW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # walk W^T's structure (dx = dy @ W)
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0: none, 1: gelu
    STORE_PRE: tl.constexpr,  # also store the pre-activation (for GELU's backward)
    INPUT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,  # running under TRITON_INTERPRET=1
):
    # Output tile: BLOCK_M rows x one output block row of width OUT_B.
    # Not transposed: W's blocks are [BH, BW] = [OUT_B, IN_B].
    # Transposed: W^T's blocks are W's blocks transposed, [BW, BH] = [OUT_B, IN_B].
    OUT_B: tl.constexpr = BW if TRANSPOSED else BH
    IN_B: tl.constexpr = BH if TRANSPOSED else BW
    # Block rows are launched heaviest first (row_order, computed once per
    # structure): with uneven rows the long ones start early instead of
    # trailing at the end of the grid. Axis 0 walks M fastest, so the
    # programs of one block row run together and share its weight blocks in L2.
    pid_m = tl.program_id(0)
    block_row = tl.load(row_order_ptr + tl.program_id(1))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_in = tl.arange(0, IN_B)
    offs_out = tl.arange(0, OUT_B)
    row_mask = offs_m < M

    acc = tl.zeros((BLOCK_M, OUT_B), dtype=tl.float32)
    start = tl.load(crow_ptr + block_row)
    end = tl.load(crow_ptr + block_row + 1)
    if INTERPRETED:
        # Triton 3.6's interpreter cannot take loaded values as range() bounds
        # (numpy 2 refuses int() of its 1-element arrays); a while loop works
        # there. Compiled kernels keep the for loop, which Triton pipelines.
        b = start
        while b < end:
            acc = _accumulate_block(acc, b, x_ptr, values_ptr, col_ptr, source_ptr, offs_m, offs_in, offs_out, row_mask, stride_xm, stride_xk, BH, BW, IN_B, TRANSPOSED, INPUT_PRECISION)
            b += 1
    else:
        for b in range(start, end):
            acc = _accumulate_block(acc, b, x_ptr, values_ptr, col_ptr, source_ptr, offs_m, offs_in, offs_out, row_mask, stride_xm, stride_xk, BH, BW, IN_B, TRANSPOSED, INPUT_PRECISION)

    offs_n = block_row * OUT_B + offs_out
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    out_ptrs = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if STORE_PRE:
        tl.store(pre_ptr + out_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=row_mask[:, None])
    if ACTIVATION == 1:
        acc = gelu(acc)
    tl.store(y_ptr + out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _accumulate_rows(
    acc, m0, M, dy_ptr, x_ptr, offs_h, offs_w, stride_dym, stride_dyn, stride_xm, stride_xk,
    BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """acc [BH, BW] += dy[m0:m0+BLOCK_M, block rows]^T @ x[m0:m0+BLOCK_M, block cols]."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    dy_t = tl.load(dy_ptr + offs_h[:, None] * stride_dyn + offs_m[None, :] * stride_dym, mask=m_mask[None, :], other=0.0)
    x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_w[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
    return tl.dot(dy_t, x_tile, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _bsr_sdd_kernel(
    dy_ptr, x_ptr, row_ptr, col_ptr, dvalues_ptr,
    M, M_PER_SPLIT,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    NNZ,
    M_BUCKET, NNZ_BUCKET, SPLITS,  # autotuning keys only
    BH: tl.constexpr, BW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    # Program (b, s): stored block b over rows [s * M_PER_SPLIT, (s + 1) * M_PER_SPLIT) of M,
    # dW[b] (or split s's fp32 partial of it) = dy[rows, block rows]^T @ x[rows, block cols].
    b = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.load(row_ptr + b)
    col = tl.load(col_ptr + b)
    offs_h = row * BH + tl.arange(0, BH)
    offs_w = col * BW + tl.arange(0, BW)
    m_start = split * M_PER_SPLIT
    m_end = tl.minimum(M, m_start + M_PER_SPLIT)  # M_PER_SPLIT is a multiple of every BLOCK_M: tiles never straddle splits
    acc = tl.zeros((BH, BW), dtype=tl.float32)
    if INTERPRETED:  # see _bsr_matmul_kernel: triton 3.6's interpreter needs a while loop here
        m0 = m_start
        while m0 < m_end:
            acc = _accumulate_rows(acc, m0, m_end, dy_ptr, x_ptr, offs_h, offs_w, stride_dym, stride_dyn, stride_xm, stride_xk, BLOCK_M, INPUT_PRECISION)
            m0 += BLOCK_M
    else:
        for m0 in range(m_start, m_end, BLOCK_M):
            acc = _accumulate_rows(acc, m0, m_end, dy_ptr, x_ptr, offs_h, offs_w, stride_dym, stride_dyn, stride_xm, stride_xk, BLOCK_M, INPUT_PRECISION)
    block = split.to(tl.int64) * NNZ + b
    out = dvalues_ptr + block * (BH * BW) + tl.arange(0, BH)[:, None] * BW + tl.arange(0, BW)[None, :]
    tl.store(out, acc.to(dvalues_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------
# launchers (shape checks live in lotus_kernels.ops; these assume valid input)
# ---------------------------------------------------------------------------


# Tile M, warps and pipelining depth. Small tiles serve inference at small
# batch (less padding), large ones training-size M (more reuse of each weight
# block). Tuned per shape class (M and nnz rounded up to powers of two, N, K)
# and block shape on first use; LOTUS_AUTOTUNE=quick tunes over the
# ``quick`` subset, =off runs its first config untimed (_common.autotune).
_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
    for block_m, warps, stages in [
        (16, 4, 3), (32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3),
        (128, 4, 3), (128, 8, 3), (128, 8, 4), (256, 8, 3),
    ]
]
_SDD_CONFIGS = [
    triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)
    for block_m, warps, stages in [(32, 4, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (256, 8, 3)]
]
# LOTUS_AUTOTUNE=quick: a middle tile, a small-M and a large-M one; =off: the smallest tile (_common.autotune).
_MATMUL_QUICK, _MATMUL_OFF = (2, 0, 6), 0
_SDD_QUICK, _SDD_OFF = (1, 4), 0

if INTERPRET:
    # One fixed config: the interpreter is slow and its timings mean nothing.
    _INTERPRETER_META = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}
    _matmul = _bsr_matmul_kernel
    _sdd = _bsr_sdd_kernel
else:
    _INTERPRETER_META = {}
    _matmul = autotune(
        _bsr_matmul_kernel, _MATMUL_CONFIGS, ["M_BUCKET", "N", "K", "NNZ_BUCKET", "BH", "BW", "TRANSPOSED", "ACTIVATION"], _MATMUL_QUICK, _MATMUL_OFF
    )
    _sdd = autotune(_bsr_sdd_kernel, _SDD_CONFIGS, ["M_BUCKET", "NNZ_BUCKET", "SPLITS", "BH", "BW"], _SDD_QUICK, _SDD_OFF)


def bsr_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    *,
    row_order: torch.Tensor,
    source: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    store_pre_activation: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, K] (any strides) -> (y [M, out_features], pre-activation or None).

    row_order [block rows] int64: the order block rows are launched in
    (``ops.BlockSparseStructure``). With ``source`` given, (crow_indices, col_indices)
    is W^T's structure and values are W's blocks, read transposed (dx = dy @ W).
    """
    # Only x and y go through strides; everything else is read packed (see _common.packed).
    values, crow_indices, col_indices, row_order = packed(values, crow_indices, col_indices, row_order)
    source, bias = packed(source, bias)
    m, k = x.shape
    _, bh, bw = values.shape
    transposed = source is not None
    out_block = bw if transposed else bh
    y = torch.empty(m, out_features, device=x.device, dtype=x.dtype)
    pre = torch.empty_like(y) if store_pre_activation else None
    block_rows = out_features // out_block
    if m == 0 or block_rows == 0:
        return y, pre
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), block_rows)  # noqa: E731
    _matmul[grid](
        x, values, crow_indices, col_indices,
        source if transposed else col_indices,  # unused when not transposed
        row_order,
        bias if bias is not None else y,  # unused without bias
        y, pre if pre is not None else y,
        m,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        bucket(m), out_features, k, bucket(values.shape[0]),
        BH=bh, BW=bw,
        TRANSPOSED=transposed, HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATIONS.index(activation), STORE_PRE=store_pre_activation,
        INPUT_PRECISION=input_precision(x.dtype),
        INTERPRETED=INTERPRET,
        **_INTERPRETER_META,
    )
    return y, pre


# Rows of one sdd split: a multiple of every config's BLOCK_M, so no tile straddles two splits.
SDD_SPLIT_ROWS = 256


def sdd_splits(m: int, nnz: int, device: torch.device) -> int:
    """How many slices of M the sdd kernel's programs share per block.

    One program per stored block leaves most of a GPU idle when blocks are few
    and M (batch x tokens) is long: ViT-B fc1 at block 64 and density 0.1 has
    58 blocks for 132 SMs, each walking ~50k rows. Splitting M gives about
    two programs per SM; the fp32 partials are summed afterwards. One split on
    the CPU interpreter (and whenever blocks alone fill the device).
    """
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-programs // max(1, nnz)), -(-m // SDD_SPLIT_ROWS)))


def bsr_sdd(
    dy: torch.Tensor, x: torch.Tensor, block_row: torch.Tensor, col_indices: torch.Tensor, block_shape: tuple[int, int],
    splits: int | None = None,
) -> torch.Tensor:
    """dW at stored blocks: dy [M, N], x [M, K] -> dvalues [nnz, bh, bw] (fp32 accumulation, x.dtype out).

    splits: slices of M (default ``sdd_splits``); with more than one, each
    writes an fp32 partial [splits, nnz, bh, bw] and the sum is cast once.
    """
    # dy and x go through strides; the block indices are read packed (see bsr_matmul).
    block_row, col_indices = packed(block_row, col_indices)
    bh, bw = block_shape
    nnz = col_indices.numel()
    m = x.shape[0]
    if nnz == 0 or m == 0:
        return torch.zeros(nnz, bh, bw, device=x.device, dtype=x.dtype)
    splits = sdd_splits(m, nnz, x.device) if splits is None else splits
    m_per_split = -(-m // splits)
    m_per_split = -(-m_per_split // SDD_SPLIT_ROWS) * SDD_SPLIT_ROWS
    splits = -(-m // m_per_split)  # no empty split
    out = torch.empty(nnz, bh, bw, device=x.device, dtype=x.dtype) if splits == 1 else torch.empty(
        splits, nnz, bh, bw, device=x.device, dtype=torch.float32
    )
    _sdd[(nnz, splits)](
        dy, x, block_row, col_indices, out,
        m, m_per_split,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        nnz,
        bucket(m), bucket(nnz), splits,
        BH=bh, BW=bw,
        INPUT_PRECISION=input_precision(x.dtype),
        INTERPRETED=INTERPRET,
        **_INTERPRETER_META,
    )
    return out if splits == 1 else out.sum(0).to(x.dtype)
