"""Block-sparse matmul: ours (Triton) vs dense F.linear (cuBLAS) vs torch.sparse BSR (PyTorch's Triton kernel).

y = x @ W^T + b with W [N, K] at a given block density, x [M, K], M = batch x 197
tokens (ViT at 224, patch 16). Each result records time, TFLOP/s of useful
work (2*M*N*K*density per forward, 3x that for forward+backward) and the
dense time of the same shape measured in the same run, hence the speedup.

Default grid on CUDA: ViT-B MLP (fc1 768->3072, fc2 3072->768), batch 256,
densities 0.1-0.9, blocks 32 and 64, bf16. LOTUS_BENCH_FULL=1: ViT-S/B/L,
qkv/proj/fc1/fc2, batch 64 and 256, fp16 and bf16. LOTUS_BENCH_GRID=headline
(lotus gpu-check): the issue's target cases only, density 0.5. On CPU: tiny
shapes, dense vs the reference backend vs torch.sparse, so the command always runs.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import warmed_up

from lotus_kernels import masks, ops
from lotus_kernels.kernels.block_sparse_matmul import block_sparse_matmul_ref

CUDA = torch.cuda.is_available()
FULL = os.environ.get("LOTUS_BENCH_FULL") == "1"
HEADLINE = os.environ.get("LOTUS_BENCH_GRID") == "headline"
TOKENS = 197

if CUDA:
    HIDDEN = {"vit_s": 384, "vit_b": 768, "vit_l": 1024} if FULL else {"vit_b": 768}
    LAYERS = ["qkv", "proj", "fc1", "fc2"] if FULL else ["fc1", "fc2"]
    BATCHES = [64, 256] if FULL else [256]
    DTYPES = [torch.float16, torch.bfloat16] if FULL else [torch.bfloat16]
    DENSITIES = [0.5] if HEADLINE else [0.1, 0.3, 0.5, 0.7, 0.9]
    BLOCKS = [32, 64]
    PROVIDERS = ["dense", "torch_bsr", "lotus"]
else:
    HIDDEN, LAYERS, BATCHES, DTYPES = {"tiny": 64}, ["fc1"], [1], [torch.float32]
    DENSITIES, BLOCKS = [0.5], [32]
    PROVIDERS = ["dense", "torch_bsr", "reference"]


def layer_shape(hidden: int, layer: str) -> tuple[int, int]:
    """(N, K) of W [N, K] for a transformer block's linear layer."""
    return {"qkv": (3 * hidden, hidden), "proj": (hidden, hidden), "fc1": (4 * hidden, hidden), "fc2": (hidden, 4 * hidden)}[layer]


CASES = [
    pytest.param(model, layer, batch, dtype, density, block, id=f"{model}-{layer}-b{batch}-{str(dtype)[6:]}-d{density}-blk{block}")
    for model in HIDDEN
    for layer in LAYERS
    for batch in BATCHES
    for dtype in DTYPES
    for density in DENSITIES
    for block in BLOCKS
]



def make_inputs(model, layer, batch, dtype, density, block, device):
    n, k = layer_shape(HIDDEN[model], layer)
    m = batch * TOKENS
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    bias = torch.zeros(n, device=device, dtype=dtype)
    mask = masks.block_mask(w.float(), 1.0 - density, block)
    return x, w, mask, bias


def provider_fn(provider, x, w, mask, bias, block, backward):
    """A zero-argument callable for the provider (forward, or forward + backward)."""
    masked = w * mask
    n = w.shape[0]
    if provider == "dense":
        weight = masked.clone().requires_grad_(backward)
        forward = lambda inp: F.linear(inp, weight, bias)  # noqa: E731
    elif provider == "torch_bsr":
        weight = masked.to_sparse_bsr((block, block))  # PyTorch has no gradient for a sparse weight: x only
        forward = lambda inp: F.linear(inp, weight, bias)  # noqa: E731
    else:
        crow, col, values = ops.dense_to_bsr(w, mask, block)
        values.requires_grad_(backward)
        if provider == "lotus":
            structure = ops.block_sparse_structure(crow, col, n, w.shape[1], (block, block))
            forward = lambda inp: ops.block_sparse_matmul(inp, values, crow, col, n, bias, structure=structure)  # noqa: E731
        else:
            forward = lambda inp: block_sparse_matmul_ref(inp, crow, col, values, n, bias)  # noqa: E731
    if not backward:
        return lambda: forward(x)
    x_grad = x.detach().clone().requires_grad_()
    grad = torch.randn(x.shape[0], n, device=x.device, dtype=x.dtype)
    return lambda: forward(x_grad).backward(grad)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model,layer,batch,dtype,density,block", CASES)
def bench_block_sparse_matmul(record_vs_dense, bench_device, model, layer, batch, dtype, density, block, provider, mode):
    x, w, mask, bias = make_inputs(model, layer, batch, dtype, density, block, bench_device)
    backward = mode == "forward_backward"
    fn = warmed_up(provider, mode, lambda: provider_fn(provider, x, w, mask, bias, block, backward))
    n, k = w.shape
    record_vs_dense(
        fn,
        lambda: provider_fn("dense", x, w, torch.ones_like(mask), bias, block, backward),
        (model, layer, batch, dtype, mode),
        2 * x.shape[0] * n * k * density * (3 if backward else 1),
        op="block_sparse_matmul",
        provider=provider,
        mode=mode,
        shape={"M": x.shape[0], "N": n, "K": k},
        model=model,
        layer=layer,
        batch=batch,
        dtype=str(dtype),
        density=density,
        block=block,
        note="torch_bsr forward_backward computes dx only (PyTorch has no gradient for a sparse weight)" if provider == "torch_bsr" and backward else "",
    )
