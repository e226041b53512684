"""2:4 matmul: dense F.linear (cuBLAS) vs torch's semi-structured F.linear vs our SparseLinear backends.

y = x @ W^T + b, W [N, K] 2:4-sparse, x [M, K], M = batch x 197 tokens.
Records time, TFLOP/s of useful work (half the dense FLOPs: 2*M*N*K*0.5,
3x that with backward) and the dense time of the same shape from the same run.

Providers (CUDA):
- dense: F.linear on the masked dense weight (cuBLAS);
- torch_semi_structured: F.linear with a torch.sparse.to_sparse_semi_structured
  weight (PyTorch's cuSPARSELt path; forward only: it has no weight gradient);
- cusparselt / lotus / auto: SparseLinear(pattern="2:4") with backend
  "cusparselt" (ours around torch._cslt_sparse_mm), "triton" (our kernel on
  the compressed weight) and "auto" (times the candidates once per shape and
  keeps the fastest; extra_info.auto_choice records what it chose).
Weights are compressed / packed once, outside the timing.

Default grid on CUDA: ViT-B and ViT-L MLP (fc1, fc2) at batch 1, 16, 64, 256,
bf16. LOTUS_BENCH_FULL=1 adds qkv and fp16. LOTUS_BENCH_GRID=headline (lotus
gpu-check): ViT-B MLP at batch 256 and ViT-L MLP at 64 and 256 (the issue's
target cases). On CPU: one tiny shape, dense vs the reference, so the command
always runs.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import warmed_up

from lotus_kernels import SparseLinear, backends, masks

CUDA = torch.cuda.is_available()
FULL = os.environ.get("LOTUS_BENCH_FULL") == "1"
HEADLINE = os.environ.get("LOTUS_BENCH_GRID") == "headline"
TOKENS = 197

if CUDA:
    HIDDEN = {"vit_b": 768, "vit_l": 1024}
    LAYERS = ["qkv", "fc1", "fc2"] if FULL else ["fc1", "fc2"]
    BATCHES = [1, 16, 64, 256]
    DTYPES = [torch.float16, torch.bfloat16] if FULL else [torch.bfloat16]
    PROVIDERS = ["dense", "torch_semi_structured", "cusparselt", "lotus", "auto"]
else:
    HIDDEN, LAYERS, BATCHES, DTYPES = {"tiny": 64}, ["fc1"], [1], [torch.float32]
    PROVIDERS = ["dense", "reference"]


def layer_shape(hidden: int, layer: str) -> tuple[int, int]:
    return {"qkv": (3 * hidden, hidden), "fc1": (4 * hidden, hidden), "fc2": (hidden, 4 * hidden)}[layer]


GRID = [(model, layer, batch, dtype) for model in HIDDEN for layer in LAYERS for batch in BATCHES for dtype in DTYPES]
if CUDA and HEADLINE:
    GRID = [(m, layer, b, d) for m, layer, b, d in GRID if (m, b) in (("vit_b", 256), ("vit_l", 64), ("vit_l", 256))]
CASES = [pytest.param(model, layer, batch, dtype, id=f"{model}-{layer}-b{batch}-{str(dtype)[6:]}") for model, layer, batch, dtype in GRID]


SPARSE_LINEAR_BACKEND = {"cusparselt": "cusparselt", "lotus": "triton", "auto": "auto", "reference": "reference"}


def provider_fn(provider, x, w, bias, backward):
    n = w.shape[0]
    mask = masks.nm_mask(w.float())
    masked = w * mask
    if provider == "dense":
        weight = masked.clone().requires_grad_(backward)
        forward = lambda inp: F.linear(inp, weight, bias)  # noqa: E731
    elif provider == "torch_semi_structured":
        from torch.sparse import to_sparse_semi_structured

        if backward:
            pytest.skip("torch's semi-structured weight has no weight gradient")
        weight = to_sparse_semi_structured(masked)  # compressed once, not per call
        forward = lambda inp: F.linear(inp, weight, bias)  # noqa: E731
    else:
        linear = torch.nn.Linear(w.shape[1], n, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(masked)
            linear.bias.copy_(bias)
        layer = SparseLinear.from_dense(linear, "2:4", mask=mask, backend=SPARSE_LINEAR_BACKEND[provider])
        layer.requires_grad_(backward)
        forward = layer
        if not backward:
            with torch.no_grad():
                layer(x)  # packs the weight (cusparselt) / makes the auto decision, outside the timing
    if not backward:
        return lambda: forward(x)
    x_grad = x.detach().clone().requires_grad_()
    grad = torch.randn(x.shape[0], n, device=x.device, dtype=x.dtype)
    return lambda: forward(x_grad).backward(grad)


def auto_choice(n: int, k: int, rows: int, dtype, mode: str = "fwd") -> str | None:
    """What "auto" chose for an [n, k] 2:4 layer at this many rows, for inference ("fwd") or
    training ("fwd+bwd"); None if it had one candidate (e.g. on CPU)."""
    bucket = backends.rows_bucket(rows)
    for d, name in backends.auto_choices().items():
        if (d.spec.pattern, d.spec.dtype, d.out_features, d.in_features, d.rows, d.mode) == ("2:4", dtype, n, k, bucket, mode):
            return name
    return None


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model,layer,batch,dtype", CASES)
def bench_semi_structured_matmul(record_vs_dense, bench_device, model, layer, batch, dtype, provider, mode):
    n, k = layer_shape(HIDDEN[model], layer)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(bench_device, dtype)
    x = torch.randn(batch * TOKENS, k, generator=g).to(bench_device, dtype)
    bias = torch.zeros(n, device=bench_device, dtype=dtype)
    backward = mode == "forward_backward"
    fn = warmed_up(provider, mode, lambda: provider_fn(provider, x, w, bias, backward))
    choice = auto_choice(n, k, x.shape[0], dtype, "fwd+bwd" if backward else "fwd") if provider == "auto" else None
    record_vs_dense(
        fn,
        lambda: provider_fn("dense", x, w, bias, backward),
        (model, layer, batch, dtype, mode),
        2 * x.shape[0] * n * k * 0.5 * (3 if backward else 1),
        op="semi_structured_matmul",
        provider=provider,
        mode=mode,
        shape={"M": x.shape[0], "N": n, "K": k},
        model=model,
        layer=layer,
        batch=batch,
        dtype=str(dtype),
        auto_choice=choice,
    )
