"""2:4 semi-structured matmul: y = act(x @ W^T + bias) with W [N, K] in our compressed 2:4 layout.

W is stored as values [N, K/2] and metadata [N, ceil(K/32)] int32 (eight
4-bit group codes per word, code = i0 | i1 << 2; see csrc/mask_compaction.h).
Each program loads half the weight bytes plus 1/16 as much metadata for its
tile, expands the tile in registers (``_expand_tile``: codes -> the two kept
slots of each group of 4 -> values placed with tl.where), and runs a dense
tl.dot. That wins where reading the weight dominates: small M (inference at
batch 1-16). ``_ss_matmul_dx_kernel`` uses the same expansion for
dx = dy @ W; dW is a dense product gathered at the kept slots (ops layer).

Precision as in block_sparse_matmul: fp32 accumulation; fp32 inputs follow
torch's fp32 matmul setting (TF32 only when torch allows it). ``semi_structured_matmul_ref`` is the pure-torch reference.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..layouts import decompress_2to4_ref
from ._common import ACTIVATIONS, INTERPRET, gelu, input_precision, packed



def semi_structured_matmul_ref(
    x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """x [..., K] -> act(x @ W^T + bias) [..., N], W = decompress_2to4(values [N, K/2], metadata)."""
    y = F.linear(x, decompress_2to4_ref(values, metadata), bias)
    return F.gelu(y) if activation == "gelu" else y


@triton.jit
def _expand_tile(values_ptr, meta_ptr, offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dense W tile [BLOCK_N, BLOCK_K] of rows offs_n, columns k0..k0+BLOCK_K (BLOCK_K % 32 == 0, k0 % 32 == 0)."""
    GROUPS: tl.constexpr = BLOCK_K // 4
    WORDS: tl.constexpr = BLOCK_K // 32
    half_k = K // 2
    words_per_row = (K // 4 + 7) // 8
    n_mask = offs_n < N
    # Metadata words [BLOCK_N, WORDS] -> group codes [BLOCK_N, GROUPS].
    offs_w = k0 // 32 + tl.arange(0, WORDS)
    words = tl.load(
        meta_ptr + offs_n[:, None] * words_per_row + offs_w[None, :],
        mask=n_mask[:, None] & (offs_w[None, :] < words_per_row),
        other=0,
    )
    shifts = 4 * tl.arange(0, 8)
    # An arithmetic shift of a negative word fills the top with ones; the & 0xF
    # keeps only the 4 bits wanted, so signed int32 words decode correctly.
    codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_N, GROUPS))
    i0 = codes & 3
    i1 = codes >> 2
    # Kept values [BLOCK_N, GROUPS, 2]: two per group, in slot order.
    offs_g = k0 // 4 + tl.arange(0, GROUPS)
    g_mask = n_mask[:, None] & (offs_g[None, :] < K // 4)
    pair = values_ptr + offs_n[:, None] * half_k + 2 * offs_g[None, :]
    v0 = tl.load(pair, mask=g_mask, other=0.0)
    v1 = tl.load(pair + 1, mask=g_mask, other=0.0)
    slot = tl.arange(0, 4)[None, None, :]
    dense = tl.where(
        slot == i0[:, :, None],
        v0[:, :, None],
        tl.where(slot == i1[:, :, None], v1[:, :, None], tl.zeros_like(v0)[:, :, None]),
    )
    return tl.reshape(dense, (BLOCK_N, BLOCK_K))


@triton.jit
def _ss_matmul_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, pre_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INTERPRETED:  # triton 3.6's interpreter cannot take int arguments as range() bounds
        k0 = 0
        while k0 < K:
            x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk, mask=(offs_m[:, None] < M) & ((k0 + offs_k)[None, :] < K), other=0.0)
            w = _expand_tile(values_ptr, meta_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K)
            acc = tl.dot(x_tile, tl.trans(w), acc, input_precision=INPUT_PRECISION)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk, mask=(offs_m[:, None] < M) & ((k0 + offs_k)[None, :] < K), other=0.0)
            w = _expand_tile(values_ptr, meta_ptr, offs_n, k0, N, K, BLOCK_N, BLOCK_K)
            acc = tl.dot(x_tile, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    if ACTIVATION == 1:
        acc = gelu(acc)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _ss_matmul_dx_kernel(
    dy_ptr, values_ptr, meta_ptr, dx_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # dx [M, K] = dy [M, N] @ W [N, K]: each program owns a [BLOCK_M, BLOCK_K]
    # tile of dx and walks N, expanding W's [BLOCK_N, BLOCK_K] tiles. It
    # computes the transpose, dx^T = W^T @ dy^T, so that the expanded tile
    # enters the dot as operand A, as in the forward kernel: as operand B,
    # Triton's Hopper pipeline rejects its layout for fp32 (found by the
    # ahead-of-time compile test).
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_nn = tl.arange(0, BLOCK_N)
    acc_t = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    if INTERPRETED:
        n0 = 0
        while n0 < N:
            dy_t = tl.load(dy_ptr + (n0 + offs_nn)[:, None] * stride_dyn + offs_m[None, :] * stride_dym, mask=((n0 + offs_nn)[:, None] < N) & (offs_m[None, :] < M), other=0.0)
            w = _expand_tile(values_ptr, meta_ptr, n0 + offs_nn, k0, N, K, BLOCK_N, BLOCK_K)
            acc_t = tl.dot(tl.trans(w), dy_t, acc_t, input_precision=INPUT_PRECISION)
            n0 += BLOCK_N
    else:
        for n0 in range(0, N, BLOCK_N):
            dy_t = tl.load(dy_ptr + (n0 + offs_nn)[:, None] * stride_dyn + offs_m[None, :] * stride_dym, mask=((n0 + offs_nn)[:, None] < N) & (offs_m[None, :] < M), other=0.0)
            w = _expand_tile(values_ptr, meta_ptr, n0 + offs_nn, k0, N, K, BLOCK_N, BLOCK_K)
            acc_t = tl.dot(tl.trans(w), dy_t, acc_t, input_precision=INPUT_PRECISION)
    out = offs_k[:, None] * stride_dxk + offs_m[None, :] * stride_dxm
    tl.store(dx_ptr + out, acc_t.to(dx_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_m[None, :] < M))



def _tiles(m: int) -> dict:
    """Tile sizes: small M is the case this kernel exists for (weight-read bound)."""
    if INTERPRET:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def ss_matmul(
    x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, *, bias=None, activation: str = "none", store_pre_activation: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, K] (any strides) -> (y [M, N], pre-activation or None); W from values [N, K/2], metadata."""
    values, metadata, bias = packed(values, metadata, bias)
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    pre = torch.empty_like(y) if store_pre_activation else None
    if m == 0 or n == 0:
        return y, pre
    meta = _tiles(m)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    _ss_matmul_kernel[grid](
        x, values, metadata, bias if bias is not None else y, y, pre if pre is not None else y,
        m, n, k,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS.index(activation), STORE_PRE=store_pre_activation,
        INPUT_PRECISION=input_precision(x.dtype), INTERPRETED=INTERPRET,
        **meta,
    )
    return y, pre


def ss_matmul_dx(dy: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, in_features: int) -> torch.Tensor:
    """dy [M, N] (any strides) -> dx [M, K] = dy @ W."""
    values, metadata = packed(values, metadata)
    m, n = dy.shape
    dx = torch.empty(m, in_features, device=dy.device, dtype=dy.dtype)
    if m == 0:
        return dx
    if n == 0:
        return dx.zero_()
    meta = _tiles(m)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(in_features, meta["BLOCK_K"]))
    _ss_matmul_dx_kernel[grid](
        dy, values, metadata, dx,
        m, n, in_features,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        INPUT_PRECISION=input_precision(dy.dtype), INTERPRETED=INTERPRET,
        **meta,
    )
    return dx
