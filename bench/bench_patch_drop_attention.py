"""Patch-dropping attention: ours (fused gather + flash, Triton) vs gather + SDPA vs full-token SDPA.

Attention of a ViT layer whose qkv projection [B, N, 3C] covers all N tokens
while only K = 1 + ceil(keep * (N - 1)) are kept (the CLS token and the top
patches): the dense provider attends all N tokens (what timm runs without
dropping), "gather_sdpa" copies the kept q/k/v rows and runs SDPA on them,
"lotus" reads them through the index inside the kernel. Useful work is the
kept tokens' attention: 4*B*H*K^2*D FLOPs forward, 3.5x that for
forward+backward (FlashAttention's convention: backward = 2.5 forwards).
Provider "dense" is full-token SDPA; speedup vs dense is against it (the quadratic limit at keep k
is about 1/k^2).

A second group times whole ViT blocks: timm's Block on all N tokens (dense),
a block that drops at itself (CLS-attention top-k, ``PatchDropBlock``), and
a block already running on the K kept tokens (after input dropping).

Default grid on CUDA: ViT-S and ViT-B at N=197 (batch 256) and ViT-L at
N=577 (batch 64), keep 0.25/0.5/0.7/1.0, bf16. LOTUS_BENCH_FULL=1: batch 64
and 256 for every model at N=197 and 577. LOTUS_BENCH_GRID=headline (lotus
gpu-check): ViT-B at N=197, batch 256, keep 0.25 and 0.5. On CPU: a tiny
shape through the sdpa/reference paths, so the command always runs.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import warmed_up

from lotus_kernels import ops
from lotus_kernels.nn.patch_dropping import PatchDropAttention, PatchDropBlock, num_kept, random_patches, with_prefix

CUDA = torch.cuda.is_available()
FULL = os.environ.get("LOTUS_BENCH_FULL") == "1"
HEADLINE = os.environ.get("LOTUS_BENCH_GRID") == "headline"
MODELS = {"vit_s": (384, 6), "vit_b": (768, 12), "vit_l": (1024, 16), "tiny": (48, 3)}

if CUDA:
    if FULL:
        SHAPES = [(m, n, b) for m in ("vit_s", "vit_b", "vit_l") for n in (197, 577) for b in (64, 256)]
    elif HEADLINE:
        SHAPES = [("vit_b", 197, 256)]
    else:
        SHAPES = [("vit_s", 197, 256), ("vit_b", 197, 256), ("vit_l", 577, 64)]
    KEEPS = [0.25, 0.5] if HEADLINE else [0.25, 0.5, 0.7, 1.0]
    DTYPE = torch.bfloat16
    PROVIDERS = ["dense", "gather_sdpa", "lotus"]
else:
    SHAPES, KEEPS, DTYPE = [("tiny", 17, 2)], [0.5], torch.float32
    PROVIDERS = ["dense", "gather_sdpa", "reference"]

CASES = [pytest.param(m, n, b, keep, id=f"{m}-n{n}-b{b}-keep{keep}") for m, n, b in SHAPES for keep in KEEPS]


def make_qkv(model, n, batch, keep, device, requires_grad):
    dim, heads = MODELS[model]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, n, 3 * dim, generator=g).to(device, DTYPE).requires_grad_(requires_grad)
    keep_idx = with_prefix(random_patches(batch, n - 1, num_kept(keep, n - 1), device), 1).to(torch.int32)
    return qkv, keep_idx, heads


def attention_fn(provider, qkv, keep_idx, heads, backward):
    b, n, c = qkv.shape
    if provider == "dense":
        def forward():
            q, k, v = qkv.view(b, n, 3, heads, c // (3 * heads)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)
    else:
        backend = {"gather_sdpa": "sdpa", "lotus": "triton", "reference": "reference"}[provider]

        def forward():
            return ops.patch_drop_attention(qkv, keep_idx, heads, backend=backend, validate=False, padded=False)

    if not backward:
        return forward
    grad = None

    def forward_backward():
        nonlocal grad
        out = forward()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return forward_backward


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model,n,batch,keep", CASES)
def bench_patch_drop_attention(record_vs_dense, bench_device, model, n, batch, keep, provider, mode):
    backward = mode == "forward_backward"
    qkv, keep_idx, heads = make_qkv(model, n, batch, keep, bench_device, backward)
    fn = warmed_up(provider, mode, lambda: attention_fn(provider, qkv, keep_idx, heads, backward))
    k = keep_idx.shape[1]
    dim = MODELS[model][0]
    record_vs_dense(
        fn,
        lambda: attention_fn("dense", qkv, keep_idx, heads, backward),
        (model, n, batch, mode),
        4 * batch * k * k * dim * (3.5 if backward else 1),
        op="patch_drop_attention",
        provider=provider,
        mode=mode,
        model=model,
        tokens=n,
        kept_tokens=k,
        keep_ratio=keep,
        batch=batch,
        heads=heads,
        head_dim=dim // heads,
        dtype=str(DTYPE),
    )


# ---------------------------------------------------------------------------
# whole ViT blocks
# ---------------------------------------------------------------------------

BLOCK_VARIANTS = ["dense", "drop_here", "on_kept"]


def make_block(model, device, variant, keep):
    import timm.models.vision_transformer as vt

    dim, heads = MODELS[model]
    torch.manual_seed(0)
    block = vt.Block(dim, heads, qkv_bias=True).to(device, DTYPE)
    if variant == "dense":
        return block
    attn = PatchDropAttention(block.attn, num_prefix_tokens=1)
    return PatchDropBlock(block, attn, keep if variant == "drop_here" else None, "cls_attention")


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
@pytest.mark.parametrize("model,n,batch,keep", [c for c in CASES if c.values[3] in (0.5, 0.7)] or CASES)
def bench_vit_block_patch_drop(record_vs_dense, bench_device, model, n, batch, keep, variant, mode):
    backward = mode == "forward_backward"
    dim, heads = MODELS[model]
    tokens = n if variant != "on_kept" else 1 + num_kept(keep, n - 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, dim, generator=g).to(bench_device, DTYPE).requires_grad_(backward)

    def make(variant=variant, x=x):
        block = make_block(model, bench_device, variant, keep)

        def forward():
            return block(x)

        if not backward:
            return forward
        return lambda: forward().float().sum().backward()

    fn = warmed_up(variant, mode, make)
    x_dense = torch.randn(batch, n, dim, generator=g).to(bench_device, DTYPE).requires_grad_(backward)
    kept = 1 + num_kept(keep, n - 1)
    # Useful work of the kept tokens through one block: qkv+proj+MLP (24*K*C^2) and attention (4*K^2*C), forward.
    useful = batch * (24 * kept * dim * dim + 4 * kept * kept * dim) * (3 if backward else 1)
    record_vs_dense(
        fn,
        lambda: make("dense", x_dense),
        ("block", model, n, batch, mode),
        useful,
        op="vit_block_patch_drop",
        provider=variant,
        mode=mode,
        model=model,
        tokens=n,
        kept_tokens=kept,
        keep_ratio=keep,
        batch=batch,
        dtype=str(DTYPE),
    )
