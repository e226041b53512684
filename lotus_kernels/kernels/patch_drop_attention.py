"""Patch-dropping attention: flash attention over the kept tokens of a ViT, gathered inside the loads.

softmax(q_K k_K^T * scale) v_K for the kept tokens K = keep_idx[b] of each
image, read straight from timm's fused qkv projection [B, N, 3, H, D]: the
q/k/v rows of a kept token are loaded through the index, so no gathered copy
of qkv is ever made, and dropped tokens cost nothing (neither as queries nor
as keys).

Kernels (one name everywhere: kernel, op, module, test, bench):
- ``_pda_fwd_kernel``: one program per (BLOCK_M kept queries, image, head);
  online softmax over the kept keys in BLOCK_N steps (FlashAttention-2),
  scores in log2 units so the exponentials are exp2. Writes the output
  [B, K, H, D] and the row log-sum-exp [B, H, K] (for the backward). With
  ``CLS`` the program that owns kept row 0 (the CLS token) then re-reads the
  keys once and writes that row's attention probabilities, normalised with
  the row's final log-sum-exp from the same pass: the CLS attention EViT and
  the data lottery tickets select patches with, which flash kernels usually
  cannot give because they never hold a normalised probability row.
- ``_pda_bwd_dkdv_kernel`` / ``_pda_bwd_dq_kernel``: FlashAttention-2
  backward split in two so that every gradient row has one writer (no
  atomics, deterministic). They scatter dq/dk/dv into the full-token gradient
  [B, N, 3, H, D] at the kept tokens; dropped tokens keep their zeros.

Rows: keep_idx [B, K] int32, each row starting with the prefix (CLS) tokens
and optionally padded with trailing -1 (per-row counts, ``counts[b]`` valid
entries); padded query rows output zeros and padded keys are masked out;
forward programs whose query rows are all padding skip the key loop.

Precision: fp16/bf16 accumulate in fp32 (scores, softmax statistics and the
output accumulator); fp32 inputs follow torch's fp32 matmul setting (full
fp32 by default, TF32 after ``torch.set_float32_matmul_precision("high")``),
exact arithmetic under TRITON_INTERPRET=1. ``patch_drop_attention_ref`` gathers,
then runs softmax attention in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune, bucket, input_precision

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------


def patch_drop_attention_ref(
    qkv: torch.Tensor,
    keep_idx: torch.Tensor | None,
    num_heads: int,
    scale: float | None = None,
    return_cls_attention: bool = False,
    num_prefix_tokens: int = 1,
):
    """Gather, then softmax attention in fp32.

    qkv [B, N, 3*H*D] or [B, N, 3, H, D]; keep_idx [B, K] (trailing -1 pads a
    row) or None for all N tokens -> out [B, K, H*D] in qkv's dtype, zeros at
    padded rows; with return_cls_attention also cls [B, K - num_prefix_tokens]
    fp32: kept row 0's attention probabilities over the kept patches, averaged
    over heads (zeros at padded positions).
    """
    b, n = qkv.shape[:2]
    qkv5 = qkv.reshape(b, n, 3, num_heads, -1)
    d = qkv5.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if keep_idx is None:
        keep_idx = torch.arange(n, device=qkv.device).expand(b, n)
    valid = keep_idx >= 0  # [B, K]
    index = keep_idx.clamp_min(0).long()
    kept = qkv5.gather(1, index[:, :, None, None, None].expand(-1, -1, 3, num_heads, d)).float()
    q, k, v = kept.unbind(2)  # [B, K, H, D] each
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    out = out.masked_fill(~valid[:, :, None, None], 0).reshape(b, -1, num_heads * d).to(qkv.dtype)
    if not return_cls_attention:
        return out
    cls = probs[:, :, 0, num_prefix_tokens:].mean(1)
    return out, cls.masked_fill(~valid[:, num_prefix_tokens:], 0)


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _token_rows(idx_ptr, b, offs, valid, stride_ib, stride_ik, IDENTITY: tl.constexpr):
    """Token positions (int64) of kept slots offs of image b; 0 where not valid (loads are masked anyway)."""
    if IDENTITY:
        tok = offs
    else:
        tok = tl.load(idx_ptr + b * stride_ib + offs * stride_ik, mask=valid, other=0)
    return tok.to(tl.int64)


@triton.jit
def _load_rows(base, tok, valid, offs_d, d_valid, stride_n, stride_d):
    """[len(tok), BLOCK_D] rows of one of q/k/v (base already offset to it and the head)."""
    return tl.load(base + tok[:, None] * stride_n + offs_d[None, :] * stride_d, mask=valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _load_rows_t(base, tok, valid, offs_d, d_valid, stride_n, stride_d):
    """[BLOCK_D, len(tok)]: the transposed rows, for q @ k^T without a register transpose."""
    return tl.load(base + tok[None, :] * stride_n + offs_d[:, None] * stride_d, mask=valid[None, :] & d_valid[:, None], other=0.0)


@triton.jit
def _fwd_step(
    acc, m_i, l_i, q, start_n, count, b, idx_ptr, k_base, v_base, offs_d, d_valid,
    stride_ib, stride_ik, stride_n, stride_d, qk_scale,
    BLOCK_N: tl.constexpr, IDENTITY: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One online-softmax step over kept keys [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < count
    tok_n = _token_rows(idx_ptr, b, offs_n, n_valid, stride_ib, stride_ik, IDENTITY)
    k_t = _load_rows_t(k_base, tok_n, n_valid, offs_d, d_valid, stride_n, stride_d)
    s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
    s = tl.where(n_valid[None, :], s, float("-inf"))
    # Row 0 of the kept set (the CLS token) is always a valid key, so the
    # running max is finite after the first step and exp2(-inf - m) is 0.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, tok_n, n_valid, offs_d, d_valid, stride_n, stride_d)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _cls_step(
    cls_base, q0, lse0, start_n, count, K, b, idx_ptr, k_base, offs_d, d_valid,
    stride_ib, stride_ik, stride_n, stride_d, qk_scale,
    BLOCK_N: tl.constexpr, IDENTITY: tl.constexpr, NUM_PREFIX: tl.constexpr,
):
    """CLS-row probabilities for kept keys [start_n, start_n + BLOCK_N): exp2(s_0j - lse_0), 0 for prefix/padding."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < count
    tok_n = _token_rows(idx_ptr, b, offs_n, n_valid, stride_ib, stride_ik, IDENTITY)
    k_t = _load_rows_t(k_base, tok_n, n_valid, offs_d, d_valid, stride_n, stride_d).to(tl.float32)
    s = tl.sum(q0[:, None] * k_t, 0) * qk_scale
    p = tl.where(n_valid & (offs_n >= NUM_PREFIX), tl.exp2(s - lse0), 0.0)
    tl.store(cls_base + offs_n, p, mask=offs_n < K)


@triton.jit
def _pda_fwd_kernel(
    qkv_ptr, idx_ptr, count_ptr, out_ptr, lse_ptr, cls_ptr,
    H, K,
    stride_b, stride_n, stride_3, stride_h, stride_d,
    stride_ib, stride_ik,
    stride_ob, stride_ok, stride_oh, stride_od,
    qk_scale,  # softmax scale * log2(e)
    K_BUCKET,  # autotuning key only
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IDENTITY: tl.constexpr,  # keep every token (no index)
    CLS: tl.constexpr,  # also write the CLS row's attention probabilities
    NUM_PREFIX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    count = tl.load(count_ptr + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D  # head_dim 80/96 run in a 128-wide tile
    m_valid = offs_m < count
    q_base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
    k_base = q_base + stride_3
    v_base = k_base + stride_3
    tok_m = _token_rows(idx_ptr, b, offs_m, m_valid, stride_ib, stride_ik, IDENTITY)
    q = _load_rows(q_base, tok_m, m_valid, offs_d, d_valid, stride_n, stride_d)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Only the valid kept keys are visited: a row keeping K tokens costs K, not N.
    # A block of pure padding (an image keeping fewer than K tokens) has no
    # query and skips the keys altogether; it still stores its zeros below.
    if pid_m * BLOCK_M < count:
        if INTERPRETED:
            # Triton 3.6's interpreter cannot take loaded values as range() bounds.
            start_n = 0
            while start_n < count:
                acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, start_n, count, b, idx_ptr, k_base, v_base, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, qk_scale, BLOCK_N, IDENTITY, INPUT_PRECISION)
                start_n += BLOCK_N
        else:
            for start_n in range(0, count, BLOCK_N):
                acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, start_n, count, b, idx_ptr, k_base, v_base, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, qk_scale, BLOCK_N, IDENTITY, INPUT_PRECISION)

    # Padded rows: output zeros (not the attention of a dummy query) and lse 0
    # (never read: the backward masks padded rows). l_i is 0 there when the
    # key loop was skipped, so divide by 1 instead: no 0/0 even in dead lanes.
    l_i = tl.where(m_valid, l_i, 1.0)
    lse = tl.where(m_valid, m_i + tl.log2(l_i), 0.0)
    acc = tl.where(m_valid[:, None], acc / l_i[:, None], 0.0)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ok + offs_d[None, :] * stride_od
    in_k = offs_m < K
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_k[:, None] & d_valid[None, :])
    lse_base = lse_ptr + pid_bh.to(tl.int64) * K
    tl.store(lse_base + offs_m, lse, mask=in_k)

    if CLS:
        if pid_m == 0:
            # Kept row 0 lives in this program. Its probabilities need the
            # final log-sum-exp, known only now: re-read the keys once (one
            # query row, K*D loads) and normalise exactly like the output was.
            is_row0 = offs_m[:, None] == 0
            q0 = tl.sum(tl.where(is_row0, q.to(tl.float32), 0.0), 0)
            lse0 = tl.sum(tl.where(offs_m == 0, lse, 0.0), 0)
            cls_base = cls_ptr + pid_bh.to(tl.int64) * K
            if INTERPRETED:
                start_n = 0
                while start_n < K:
                    _cls_step(cls_base, q0, lse0, start_n, count, K, b, idx_ptr, k_base, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, qk_scale, BLOCK_N, IDENTITY, NUM_PREFIX)
                    start_n += BLOCK_N
            else:
                for start_n in range(0, K, BLOCK_N):
                    _cls_step(cls_base, q0, lse0, start_n, count, K, b, idx_ptr, k_base, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, qk_scale, BLOCK_N, IDENTITY, NUM_PREFIX)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, start_m, count, b, pid_bh, K, idx_ptr, q_base, do_base, lse_ptr, delta_ptr, offs_n, n_valid, offs_d, d_valid,
    stride_ib, stride_ik, stride_n, stride_d, stride_dok, stride_dod, qk_scale,
    BLOCK_M: tl.constexpr, IDENTITY: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dk, dv [BLOCK_N, BLOCK_D] += this key block's share of kept queries [start_m, start_m + BLOCK_M)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < count
    tok_m = _token_rows(idx_ptr, b, offs_m, m_valid, stride_ib, stride_ik, IDENTITY)
    q = _load_rows(q_base, tok_m, m_valid, offs_d, d_valid, stride_n, stride_d)
    do = tl.load(do_base + offs_m[:, None] * stride_dok + offs_d[None, :] * stride_dod, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * K + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * K + offs_m, mask=m_valid, other=0.0)
    # Work on the transposed scores [BLOCK_N, BLOCK_M] so p^T and dS^T need no register transpose.
    s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
    p_t = tl.where(n_valid[:, None] & m_valid[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _pda_bwd_dkdv_kernel(
    qkv_ptr, idx_ptr, count_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    H, K,
    stride_b, stride_n, stride_3, stride_h, stride_d,
    stride_ib, stride_ik,
    stride_dob, stride_dok, stride_doh, stride_dod,
    stride_gb, stride_gn, stride_g3, stride_gh, stride_gd,
    qk_scale, sm_scale,
    K_BUCKET,  # autotuning key only
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IDENTITY: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # One program per (BLOCK_N kept keys, image, head): it owns those keys'
    # dk/dv rows and walks every kept query, so each row has a single writer.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    count = tl.load(count_ptr + b)
    if pid_n * BLOCK_N < count:  # blocks of pure padding have nothing to do
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        n_valid = offs_n < count
        q_base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
        tok_n = _token_rows(idx_ptr, b, offs_n, n_valid, stride_ib, stride_ik, IDENTITY)
        k = _load_rows(q_base + stride_3, tok_n, n_valid, offs_d, d_valid, stride_n, stride_d)
        v = _load_rows(q_base + 2 * stride_3, tok_n, n_valid, offs_d, d_valid, stride_n, stride_d)
        do_base = do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        if INTERPRETED:
            start_m = 0
            while start_m < count:
                dk, dv = _dkdv_step(dk, dv, k, v, start_m, count, b, pid_bh, K, idx_ptr, q_base, do_base, lse_ptr, delta_ptr, offs_n, n_valid, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, stride_dok, stride_dod, qk_scale, BLOCK_M, IDENTITY, INPUT_PRECISION)
                start_m += BLOCK_M
        else:
            for start_m in range(0, count, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, start_m, count, b, pid_bh, K, idx_ptr, q_base, do_base, lse_ptr, delta_ptr, offs_n, n_valid, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, stride_dok, stride_dod, qk_scale, BLOCK_M, IDENTITY, INPUT_PRECISION)
        # Scatter into the full-token gradient: kept token rows only.
        g_base = dqkv_ptr + b.to(tl.int64) * stride_gb + h * stride_gh
        mask = n_valid[:, None] & d_valid[None, :]
        g_rows = tok_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
        tl.store(g_base + stride_g3 + g_rows, (dk * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=mask)
        tl.store(g_base + 2 * stride_g3 + g_rows, dv.to(dqkv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, m_valid, start_n, count, b, idx_ptr, k_base, v_base, offs_d, d_valid,
    stride_ib, stride_ik, stride_n, stride_d, qk_scale,
    BLOCK_N: tl.constexpr, IDENTITY: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dq [BLOCK_M, BLOCK_D] += the share of kept keys [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < count
    tok_n = _token_rows(idx_ptr, b, offs_n, n_valid, stride_ib, stride_ik, IDENTITY)
    k = _load_rows(k_base, tok_n, n_valid, offs_d, d_valid, stride_n, stride_d)
    v_t = _load_rows_t(v_base, tok_n, n_valid, offs_d, d_valid, stride_n, stride_d)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, v_t, input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)


@triton.jit
def _pda_bwd_dq_kernel(
    qkv_ptr, idx_ptr, count_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    H, K,
    stride_b, stride_n, stride_3, stride_h, stride_d,
    stride_ib, stride_ik,
    stride_dob, stride_dok, stride_doh, stride_dod,
    stride_gb, stride_gn, stride_g3, stride_gh, stride_gd,
    qk_scale, sm_scale,
    K_BUCKET,  # autotuning key only
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IDENTITY: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # One program per (BLOCK_M kept queries, image, head), walking the kept keys.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    count = tl.load(count_ptr + b)
    if pid_m * BLOCK_M < count:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        m_valid = offs_m < count
        q_base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
        tok_m = _token_rows(idx_ptr, b, offs_m, m_valid, stride_ib, stride_ik, IDENTITY)
        q = _load_rows(q_base, tok_m, m_valid, offs_d, d_valid, stride_n, stride_d)
        do = tl.load(
            do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * stride_dok + offs_d[None, :] * stride_dod,
            mask=m_valid[:, None] & d_valid[None, :], other=0.0,
        )
        lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * K + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * K + offs_m, mask=m_valid, other=0.0)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        k_base = q_base + stride_3
        v_base = k_base + stride_3
        if INTERPRETED:
            start_n = 0
            while start_n < count:
                dq = _dq_step(dq, q, do, lse, delta, m_valid, start_n, count, b, idx_ptr, k_base, v_base, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, qk_scale, BLOCK_N, IDENTITY, INPUT_PRECISION)
                start_n += BLOCK_N
        else:
            for start_n in range(0, count, BLOCK_N):
                dq = _dq_step(dq, q, do, lse, delta, m_valid, start_n, count, b, idx_ptr, k_base, v_base, offs_d, d_valid, stride_ib, stride_ik, stride_n, stride_d, qk_scale, BLOCK_N, IDENTITY, INPUT_PRECISION)
        g_ptrs = dqkv_ptr + b.to(tl.int64) * stride_gb + h * stride_gh + tok_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
        tl.store(g_ptrs, (dq * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


# ---------------------------------------------------------------------------
# launchers (argument checks live in lotus_kernels.ops; these assume valid input)
# ---------------------------------------------------------------------------


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)]
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 8, 3), (32, 32, 4, 2), (64, 32, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2)]
]
# LOTUS_AUTOTUNE=quick (see _common.autotune): 64x64 tiles and one alternative; =off: the smallest tile, which
# fits every arch's shared memory even in fp32 at head_dim 128 (the ahead-of-time compile test checks it).
_FWD_QUICK, _FWD_OFF = (1, 3), 5
_BWD_QUICK, _BWD_OFF = (1, 0), 3

if INTERPRET:
    # One small fixed config: the interpreter is slow and its timings mean nothing.
    _INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    _fwd = _pda_fwd_kernel
    _bwd_dkdv = _pda_bwd_dkdv_kernel
    _bwd_dq = _pda_bwd_dq_kernel
else:
    _INTERPRETER_META = {}
    _fwd = autotune(_pda_fwd_kernel, _FWD_CONFIGS, ["K_BUCKET", "BLOCK_D", "CLS", "IDENTITY"], _FWD_QUICK, _FWD_OFF)
    _bwd_dkdv = autotune(_pda_bwd_dkdv_kernel, _BWD_CONFIGS, ["K_BUCKET", "BLOCK_D", "IDENTITY"], _BWD_QUICK, _BWD_OFF)
    _bwd_dq = autotune(_pda_bwd_dq_kernel, _BWD_CONFIGS, ["K_BUCKET", "BLOCK_D", "IDENTITY"], _BWD_QUICK, _BWD_OFF)


def _index_args(keep_idx: torch.Tensor | None, counts: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if keep_idx is None:
        return counts, 0, 0  # never read (IDENTITY)
    return keep_idx, keep_idx.stride(0), keep_idx.stride(1)


def pda_forward(
    qkv5: torch.Tensor,
    keep_idx: torch.Tensor | None,
    counts: torch.Tensor,
    scale: float,
    num_prefix_tokens: int,
    return_cls: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv5 [B, N, 3, H, D] (any strides), keep_idx [B, K] int32 or None (all N), counts [B] int32
    -> (out [B, K, H, D], lse [B, H, K] fp32 in log2 units, cls [B, H, K] fp32 or an empty tensor)."""
    b, n, _, h, d = qkv5.shape
    k = n if keep_idx is None else keep_idx.shape[1]
    out = torch.empty(b, k, h, d, device=qkv5.device, dtype=qkv5.dtype)
    lse = torch.empty(b, h, k, device=qkv5.device, dtype=torch.float32)
    cls = torch.empty(b, h, k, device=qkv5.device, dtype=torch.float32) if return_cls else lse.new_empty(0)
    if b == 0 or h == 0:
        return out, lse, cls
    idx, stride_ib, stride_ik = _index_args(keep_idx, counts)
    grid = lambda meta: (triton.cdiv(k, meta["BLOCK_M"]), b * h)  # noqa: E731
    _fwd[grid](
        qkv5, idx, counts, out, lse, cls if return_cls else lse,
        h, k,
        *qkv5.stride(),
        stride_ib, stride_ik,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        scale * LOG2E,
        bucket(k),  # kept tokens by shape class: tuned once per bucket, not per keep ratio
        D=d, BLOCK_D=_block_d(d),
        IDENTITY=keep_idx is None, CLS=return_cls, NUM_PREFIX=num_prefix_tokens,
        INPUT_PRECISION=input_precision(qkv5.dtype), INTERPRETED=INTERPRET,
        **_INTERPRETER_META,
    )
    return out, lse, cls


def pda_backward(
    grad_out: torch.Tensor,
    qkv5: torch.Tensor,
    keep_idx: torch.Tensor | None,
    counts: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """grad_out, out [B, K, H, D] -> d qkv [B, N, 3, H, D] (contiguous; zeros at dropped tokens)."""
    b, n, _, h, d = qkv5.shape
    k = out.shape[1]
    grad_qkv = torch.zeros(b, n, 3, h, d, device=qkv5.device, dtype=qkv5.dtype)
    if b == 0 or h == 0:
        return grad_qkv
    grad_out = grad_out.contiguous()
    # delta_i = rowsum(dO_i * O_i): the softmax backward's per-row correction.
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, K]
    idx, stride_ib, stride_ik = _index_args(keep_idx, counts)
    common = (
        qkv5, idx, counts, grad_out, lse, delta, grad_qkv,
        h, k,
        *qkv5.stride(),
        stride_ib, stride_ik,
        *grad_out.stride(),
        *grad_qkv.stride(),
        scale * LOG2E, scale,
        bucket(k),  # kept tokens by shape class: tuned once per bucket, not per keep ratio
    )
    meta = dict(D=d, BLOCK_D=_block_d(d), IDENTITY=keep_idx is None, INPUT_PRECISION=input_precision(qkv5.dtype), INTERPRETED=INTERPRET, **_INTERPRETER_META)
    _bwd_dkdv[lambda m: (triton.cdiv(k, m["BLOCK_N"]), b * h)](*common, **meta)
    _bwd_dq[lambda m: (triton.cdiv(k, m["BLOCK_M"]), b * h)](*common, **meta)
    return grad_qkv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
