"""The fast correctness tier (``lotus gpu-check``'s correctness steps): every op, forward and backward, in one file.

With compiled kernels (TRITON_INTERPRET=0, a GPU): fp16 and bf16 at awkward
shapes (1, 65 and 591 = 3 x 197 rows; a block row with no block and a full
one; 3 images of 197 tokens, one keeping fewer), fp32 at one shape. Under
the interpreter (CI): fp16 and fp32 at small shapes. Every result is held
to flash-attention's rule against an fp64 reference: our error <= 2x the
error of PyTorch doing the same computation in the same precision, plus a
small atol. cuSPARSELt's tests carry "cusparselt" in their names, so the
check runs them apart (``-k cusparselt``): a device fault there must not take
the rest down.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device

from lotus_kernels import SparseLinear, masks, ops
from lotus_kernels.backends import cusparselt
from lotus_kernels.backends import LayerSpec
from lotus_kernels.layouts import bsr_to_dense_ref, decompress_2to4_ref
from lotus_kernels.kernels.patch_drop_attention import patch_drop_attention_ref

DEVICE = triton_device()
CUDA = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 needs a CUDA device")

if CUDA:
    ROWS, K, N, BLOCKS = (1, 65, 591), 192, 384, (32, 64)
    DTYPES = (torch.float16, torch.bfloat16)
    HEADS, HEAD_DIM, TOKENS = 12, 64, 197
else:
    ROWS, K, N, BLOCKS = (1, 17), 64, 96, (16, 32)
    DTYPES = (torch.float16,)
    HEADS, HEAD_DIM, TOKENS = 2, 16, 17
# fp32 once: its "ieee" compile is the slow one on a GPU.
CASES = [(dtype, m) for dtype in DTYPES for m in ROWS] + [(torch.float32, ROWS[-1])]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_within(what: str, got: torch.Tensor, exact: torch.Tensor, torch_same: torch.Tensor, dtype=None) -> None:
    """|got - exact| <= 2 |torch_same - exact| + atol (max norms; the atol of ``dtype``, default got's, relative to
    the reference's magnitude)."""
    assert got.shape == exact.shape, (what, got.shape, exact.shape)
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    ours = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    theirs = (torch_same.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert ours <= 2 * theirs + ATOL[dtype or got.dtype] * scale, f"{what}: error {ours:.3g}, torch's {theirs:.3g}"


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_()


def assert_like_torch(run, tensors, names) -> None:
    """run(*leaves, dense) -> y, backpropagated inside: ours (dense=False) against PyTorch's dense computation in
    the same precision and in fp64 (dense=True); y and every input's gradient held to ``assert_within``."""
    results = {}
    for name, cast, dense in (("ours", None, False), ("torch", None, True), ("exact", torch.float64, True)):
        inputs = [leaf(t, cast) for t in tensors]
        results[name] = [run(*inputs, dense)] + [t.grad for t in inputs]
    for what, ours, theirs, exact in zip(names, *(results[k] for k in ("ours", "torch", "exact"))):
        assert_within(what, ours, exact, theirs)


def block_keep(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """A block mask at density ~0.5 whose first block row is empty and last is full."""
    keep = torch.rand(rows, cols, generator=g) < 0.5
    keep[0] = False
    keep[-1] = True
    return keep


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype,m", CASES)
def test_block_sparse_matmul_forward_backward(dtype, m, block):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(N, K, generator=g) / K**0.5
    mask = masks.expand_block_mask(block_keep(N // block, K // block, g), (block, block))
    crow, col, values = ops.dense_to_bsr(w.to(DEVICE, dtype), mask.to(DEVICE), block)
    x = torch.randn(m, K, generator=g).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype)
    grad = torch.randn(m, N, generator=g).to(DEVICE, dtype)
    activation = "gelu" if block == BLOCKS[0] else "none"

    def run(x, values, bias, dense: bool):
        if dense:  # PyTorch: the masked dense weight
            y = F.linear(x, bsr_to_dense_ref(crow, col, values, (N, K)), bias)
            y = F.gelu(y) if activation == "gelu" else y
        else:
            y = ops.block_sparse_matmul(x, values, crow, col, N, bias, activation)
        y.backward(grad.to(y.dtype))
        return y

    assert_like_torch(run, (x, values, bias), ("y", "dx", "dvalues", "dbias"))


@pytest.mark.parametrize("dtype,m", CASES)
def test_semi_structured_matmul_forward_backward(dtype, m):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(N, K, generator=g) / K**0.5
    values, metadata = ops.compress_2to4(w.to(DEVICE, dtype), masks.nm_mask(w).to(DEVICE))
    x = torch.randn(m, K, generator=g).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype)
    grad = torch.randn(m, N, generator=g).to(DEVICE, dtype)

    def run(x, values, bias, dense: bool):
        if dense:
            y = F.gelu(F.linear(x, decompress_2to4_ref(values, metadata), bias))
        else:
            y = ops.semi_structured_matmul(x, values, metadata, bias, "gelu")
        y.backward(grad.to(y.dtype))
        return y

    assert_like_torch(run, (x, values, bias), ("y", "dx", "dvalues", "dbias"))


@pytest.mark.parametrize("dtype,keep_ratio", [(d, r) for d in DTYPES for r in (0.5, 0.25)] + [(torch.float32, 0.5)])
def test_patch_drop_attention_forward_backward(dtype, keep_ratio):
    g = torch.Generator().manual_seed(0)
    b, n = 3, TOKENS
    k = 1 + round(keep_ratio * (n - 1))
    keep = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=g)[: k - 1]]) for _ in range(b)])
    keep[1, k // 2:] = -1  # one image keeps fewer tokens (trailing padding)
    keep = keep.to(DEVICE, torch.int32)
    qkv = torch.randn(b, n, 3 * HEADS * HEAD_DIM, generator=g).to(DEVICE, dtype)
    grad = torch.randn(b, k, HEADS * HEAD_DIM, generator=g).to(DEVICE, dtype)
    results = {}
    for name, cast, backend in (("ours", None, "triton"), ("torch", None, "sdpa"), ("exact", torch.float64, None)):
        q = leaf(qkv, cast)
        if backend is None:  # the reference (its softmax attention runs in fp32 whatever the input)
            out, cls = patch_drop_attention_ref(q, keep, HEADS, return_cls_attention=True)
        else:
            out, cls = ops.patch_drop_attention(q, keep, HEADS, return_cls_attention=True, backend=backend)
        out.backward(grad.to(out.dtype))
        results[name] = (out, q.grad, cls)
    for what, ours, theirs, exact in zip(("out", "dqkv", "cls"), *(results[k] for k in ("ours", "torch", "exact"))):
        assert_within(what, ours, exact.double(), theirs, dtype)  # cls is fp32 whatever the input: judged at the input's precision


def test_compaction_ops_on_the_device_match_the_cpu_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    keep = block_keep(N // BLOCKS[0], K // BLOCKS[0], g)
    on_cpu = ops.dense_to_bsr(w, keep, BLOCKS[0])
    on_device = ops.dense_to_bsr(w.to(DEVICE), keep.to(DEVICE), BLOCKS[0])
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_device, on_cpu))
    transposed = ops.bsr_transpose(*on_device, (N, K))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(transposed, ops.bsr_transpose(*on_cpu, (N, K))))
    nm = masks.nm_mask(w)
    values, metadata = ops.compress_2to4(w.to(DEVICE), nm.to(DEVICE))
    cpu_values, cpu_metadata = ops.compress_2to4(w, nm)
    assert torch.equal(values.cpu(), cpu_values) and torch.equal(metadata.cpu(), cpu_metadata)
    assert torch.equal(ops.decompress_2to4(values, metadata).cpu(), w * nm)
    keep_mask = torch.rand(5, TOKENS, generator=g) < 0.5
    keep_mask[0] = False
    keep_mask[1] = True
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ops.keep_indices(keep_mask.to(DEVICE)), ops.keep_indices(keep_mask)))


@pytest.mark.parametrize("pattern", ["block", "2:4"])
def test_sparse_linear_triton_backend_trains(pattern):
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N).to(DEVICE)
    layer = SparseLinear.from_dense(linear, pattern, sparsity=0.5, block_size=BLOCKS[-1], backend="triton")
    ref = SparseLinear.from_dense(linear, pattern, sparsity=0.5, block_size=BLOCKS[-1], backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(ROWS[-1], K, device=DEVICE)
    for module in (layer, ref):
        module(x).square().mean().backward()
    torch.testing.assert_close(layer.values.grad, ref.values.grad, rtol=1e-3, atol=1e-4)
    assert bool((layer.to_dense()[~layer.mask()] == 0).all())


# ------------------------------------------------------------ cuSPARSELt (run apart: -k cusparselt)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cusparselt_forward_backward_and_auto(dtype):
    reason = cusparselt.why_not(LayerSpec("2:4", torch.device("cuda"), dtype, None, (N, K)))
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    linear = torch.nn.Linear(K, N).to("cuda", dtype)
    layers = {b: SparseLinear.from_dense(linear, "2:4", backend=b) for b in ("cusparselt", "auto")}
    weight = layers["cusparselt"].to_dense().detach()
    for m in (1, 65, 591, 1581):
        x = torch.randn(m, K, device="cuda", dtype=dtype)
        grad = torch.randn(m, N, device="cuda", dtype=dtype)
        results = {}
        for name, cast in (("torch", None), ("exact", torch.float64)):
            xi, wi, bi = leaf(x, cast), leaf(weight, cast), leaf(linear.bias, cast)
            y = F.linear(xi, wi, bi)
            y.backward(grad.to(y.dtype))
            results[name] = (y, xi.grad)
        for backend, layer in layers.items():
            xi = leaf(x)
            y = layer(xi)
            y.backward(grad)
            for what, ours, theirs, exact in zip(("y", "dx"), (y, xi.grad), *(results[k] for k in ("torch", "exact"))):
                assert_within(f"{backend} {what} at M={m}", ours, exact, theirs)
    torch.cuda.synchronize()
