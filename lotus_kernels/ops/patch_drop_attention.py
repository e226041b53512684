"""Patch-drop attention: attention among each image's kept tokens, gathered inside the kernel from timm's fused qkv.

The op is ``torch.ops.lotus_kernels.patch_drop_attention`` (plus ``_backward``),
a custom op with a fake and autograd; its kernels are
``lotus_kernels.kernels.patch_drop_attention`` with ``patch_drop_attention_ref``.
``patch_drop_attention()`` checks its arguments, then runs the backend the
attention registry (``lotus_kernels.backends.attention``) picks: "triton"
(this op), "sdpa" (a gather copy + torch's SDPA) or "reference".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._shared import KERNEL_DTYPES
from ..backends.registry import ATTENTION, AttentionSpec
from ._common import check_tensor


# qkv travels as the 5-d view [B, N, 3, H, D] of timm's fused projection
# (no copy); keep_idx is [B, K] int32 with trailing -1 padding, or empty for
# "every token" (the kernels then skip the index loads); counts [B] int32
# holds each row's valid entries.


def _pda_kernels():
    from ..kernels import patch_drop_attention

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

PATCH_DROP_DTYPES = KERNEL_DTYPES
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
    chosen = ATTENTION.select(backend, AttentionSpec(qkv5.device, qkv5.dtype))
    return chosen.forward(qkv5, keep_idx, scale, return_cls_attention, num_prefix_tokens, padded)


def patch_drop_attention_triton(qkv5, keep_idx, scale, return_cls, num_prefix, padded=None):
    """The fused path (the "triton" backend): qkv5 [B, N, 3, H, D], keep_idx [B, K] | None -> out [B, K, H*D] (, cls).

    Arguments as checked by ``patch_drop_attention``; padded is not needed (the kernel reads each row's count).
    """
    b, n, _, h, d = qkv5.shape
    if keep_idx is None:
        index, counts = qkv5.new_empty(0, dtype=torch.int32), torch.full((b,), n, dtype=torch.int32, device=qkv5.device)
    else:
        index = keep_idx.to(torch.int32)
        counts = (index >= 0).sum(1, dtype=torch.int32)
    out, _, cls = _patch_drop_attention(qkv5, index, counts, float(scale), num_prefix, return_cls)
    out = out.reshape(b, out.shape[1], h * d)
    if not return_cls:
        return out
    return out, cls[:, :, num_prefix:].mean(1)


def patch_drop_attention_reference(qkv5, keep_idx, scale, return_cls, num_prefix, padded=None):
    """Gather + fp32 softmax attention (the "reference" backend; ``kernels.patch_drop_attention_ref``)."""
    return _pda_kernels().patch_drop_attention_ref(qkv5, keep_idx, qkv5.shape[3], scale, return_cls, num_prefix)


def patch_drop_attention_sdpa(qkv5, keep_idx, scale, return_cls, num_prefix, padded=None):
    """The unfused baseline (the "sdpa" backend): gather q/k/v (a copy), then torch's SDPA; the CLS row from one extra query row."""
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
    check_tensor(qkv, "qkv")
    ATTENTION.check_name(backend)
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
        check_tensor(keep_idx, "keep_idx")
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
