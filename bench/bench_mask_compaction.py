"""Mask compaction (one-time conversion at sparsify/load time): extension vs pure torch vs torch's own BSR.

Shapes: a ViT-B MLP weight (3072 x 768) on CUDA; a ViT-Ti one (768 x 192) on CPU.
"""

import pytest
import torch

from lotus_kernels import masks, ops
from lotus_kernels.layouts import compress_2to4_ref, dense_to_bsr_ref, keep_indices_ref


def weight_shape(device):
    return (3072, 768) if device == "cuda" else (768, 192)


@pytest.mark.parametrize("provider", ["lotus", "reference", "torch_to_sparse_bsr"])
def bench_dense_to_bsr(run_benchmark, bench_device, provider):
    weight = torch.randn(weight_shape(bench_device), device=bench_device)
    block_keep = masks.reduce_block_mask(masks.block_mask(weight, 0.5, 32), 32)
    masked = weight * masks.expand_block_mask(block_keep, 32)
    fn = {
        "lotus": lambda: ops.dense_to_bsr(masked, block_keep, 32),
        "reference": lambda: dense_to_bsr_ref(masked, block_keep, 32, 32),
        "torch_to_sparse_bsr": lambda: masked.to_sparse_bsr((32, 32)),
    }[provider]
    run_benchmark(fn, op="dense_to_bsr", provider=provider, shape=list(weight.shape), block=32, density=0.5)


@pytest.mark.parametrize("provider", ["lotus", "reference"])
def bench_compress_2to4(run_benchmark, bench_device, provider):
    weight = torch.randn(weight_shape(bench_device), device=bench_device, dtype=torch.float16)
    mask = masks.nm_mask(weight)
    fn = {"lotus": lambda: ops.compress_2to4(weight, mask), "reference": lambda: compress_2to4_ref(weight, mask)}[provider]
    run_benchmark(fn, op="compress_2to4", provider=provider, shape=list(weight.shape), dtype="float16")


@pytest.mark.parametrize("provider", ["lotus", "reference"])
def bench_keep_indices(run_benchmark, bench_device, provider):
    batch = 256 if bench_device == "cuda" else 16
    keep = torch.rand(batch, 197, device=bench_device) < 0.5  # ViT-B/16 at 224: 197 tokens
    fn = {"lotus": lambda: ops.keep_indices(keep), "reference": lambda: keep_indices_ref(keep)}[provider]
    run_benchmark(fn, op="keep_indices", provider=provider, shape=[batch, 197])
