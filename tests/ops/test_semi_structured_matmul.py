"""Triton 2:4 matmul under TRITON_INTERPRET=1 (CPU), or on CUDA with TRITON_INTERPRET=0."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_compiled_backward_matches_eager, strided, compile_for_gpu, triton_device

from lotus_kernels import SparseLinear, masks, ops
from lotus_kernels.kernels.semi_structured_matmul import semi_structured_matmul_ref

DEVICE = triton_device()
FP32_TOL = 1e-4 if DEVICE == "cpu" else 2e-2
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 needs a CUDA device")


def make_case(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    values, metadata = ops.compress_2to4(w.to(dtype), masks.nm_mask(w))
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x.to(DEVICE), values.to(DEVICE), metadata.to(DEVICE), bias.to(DEVICE)


def assert_close(got, x, values, metadata, bias, activation):
    """Kernel error vs fp64 <= 2x PyTorch's same-precision error + atol."""
    exact = semi_structured_matmul_ref(x.double(), values.double(), metadata, None if bias is None else bias.double(), activation)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = x.is_cuda
    try:
        torch_error = (semi_structured_matmul_ref(x, values, metadata, bias, activation).double() - exact).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ours = (got.double() - exact).abs().max().item()
    assert ours <= 2 * torch_error + (1e-5 if x.dtype == torch.float32 else 1e-2), (ours, torch_error)


@pytest.mark.parametrize("m", [1, 3, 65])
@pytest.mark.parametrize("k", [64, 192])
@pytest.mark.parametrize("n", [32, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_against_reference(m, k, n, dtype):
    x, values, metadata, bias = make_case(m, n, k, dtype)
    assert_close(ops.semi_structured_matmul(x, values, metadata, bias), x, values, metadata, bias, "none")


@pytest.mark.parametrize("m,n,k", [(1, 40, 36), (7, 24, 100), (65, 96, 192)])
def test_backward_and_ragged_shapes(m, n, k):
    x, values, metadata, bias = make_case(m, n, k, torch.float32)
    for t in (x, values, bias):
        t.requires_grad_()
    y = ops.semi_structured_matmul(x, values, metadata, bias, "gelu")
    assert_close(y.detach(), x.detach(), values.detach(), metadata, bias.detach(), "gelu")
    grad = torch.randn_like(y)
    y.backward(grad)
    refs = [t.detach().double().requires_grad_() for t in (x, values, bias)]
    semi_structured_matmul_ref(refs[0], refs[1], metadata, refs[2], "gelu").backward(grad.double())
    for got, ref in zip((x.grad, values.grad, bias.grad), refs):
        assert torch.allclose(got.double(), ref.grad, rtol=FP32_TOL, atol=FP32_TOL)


def forward_backward(x, values, metadata, bias, run, grad):
    """(y, dx, dvalues, dbias) of run(x, values, metadata, bias) for leaf copies of x, values, bias."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, values, bias)]
    y = run(leaves[0], leaves[1], metadata, leaves[2])
    y.backward(grad.to(y.dtype))
    return (y.detach(),) + tuple(None if t is None else t.grad for t in leaves)


def assert_grads_within_bound(ours, exact, torch_same, dtype):
    """Each of (y, dx, dvalues, dbias): error vs fp64 <= 2x PyTorch's same-precision error + atol."""
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, e, t in zip(("y", "dx", "dvalues", "dbias"), ours, exact, torch_same):
        if e is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == e.shape, (name, g.dtype, g.shape, e.shape)
        error, torch_error = ((v.double() - e).abs().max().item() for v in (g, t))
        assert error <= 2 * torch_error + atol, (name, error, torch_error)


def check_forward_backward(m, n, k, dtype, with_bias=True, activation="none", seed=0):
    x, values, metadata, bias = make_case(m, n, k, dtype, seed)
    bias = bias if with_bias else None
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    ref = lambda a, v, meta, b: semi_structured_matmul_ref(a, v, meta, b, activation)  # noqa: E731
    ours = forward_backward(x, values, metadata, bias, lambda a, v, meta, b: ops.semi_structured_matmul(a, v, meta, b, activation), grad)
    exact = forward_backward(x.double(), values.double(), metadata, None if bias is None else bias.double(), ref, grad.double())
    torch_same = forward_backward(x, values, metadata, bias, ref, grad)
    assert_grads_within_bound(ours, exact, torch_same, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (7, 100, 24), (24, 128, 64), (33, 36, 72)])
def test_backward_over_shapes_and_dtypes(m, k, n, dtype):
    # K = 100 and 36 leave a partial metadata word and a partial BLOCK_K tile;
    # N = 24 and 72 a partial BLOCK_N tile (dx walks N).
    check_forward_backward(m, n, k, dtype)


@pytest.mark.parametrize(
    "dtype,with_bias,activation",
    [(torch.float32, False, "none"), (torch.float16, False, "none"), (torch.float16, True, "gelu")],
    ids=["fp32-no_bias", "fp16-no_bias", "fp16-gelu"],
)
def test_backward_without_bias_and_fp16_gelu(dtype, with_bias, activation):
    check_forward_backward(24, 64, 128, dtype, with_bias, activation, seed=3)


@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("how", ["transposed_back", "every_other"])
def test_non_contiguous_values_metadata_and_bias_forward_and_backward(how, activation):
    # The kernels read values, metadata and bias as packed arrays; strided
    # views of them used to be read as if packed (max error ~33).
    m, n, k = 7, 40, 96  # 3 metadata words per row: a transposed-back view really moves them
    x, values, metadata, bias = make_case(m, n, k, torch.float32, seed=4)
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = lambda a, v, meta, b: semi_structured_matmul_ref(a, v, meta, b, activation)  # noqa: E731
    exact = forward_backward(x.double(), values.double(), metadata, bias.double(), ref, grad.double())
    run = lambda a, v, meta, b: ops.semi_structured_matmul(a, strided(v, how), strided(meta, how), strided(b), activation)  # noqa: E731
    ours = forward_backward(strided(x, how), values, metadata, bias, run, grad)
    for name, got, expected in zip(("y", "dx", "dvalues", "dbias"), ours, exact):
        error = (got.double() - expected).abs().max().item()
        assert error <= FP32_TOL * (1 + expected.abs().max().item()), (name, error)


def test_sparse_linear_triton_backend_matches_reference_and_trains():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64, device=DEVICE)
    layer = SparseLinear.from_dense(linear, "2:4", backend="triton")
    reference = SparseLinear.from_dense(linear, "2:4", backend="reference")
    x = torch.randn(2, 5, 96, device=DEVICE)
    assert torch.allclose(layer(x), reference(x), rtol=FP32_TOL, atol=FP32_TOL)
    mask = layer.mask()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.1)
    F.mse_loss(layer(x), torch.zeros(2, 5, 64, device=DEVICE)).backward()
    optimizer.step()
    weight = layer.to_dense()
    assert torch.equal(layer.mask(), mask) and bool((weight[~mask] == 0).all())


def test_opcheck_compile_and_bad_input():
    x, values, metadata, bias = make_case(5, 32, 64, torch.float32)
    torch.library.opcheck(
        torch.ops.lotus_kernels.semi_structured_matmul.default,
        (x, values.requires_grad_(), metadata, bias, "none", False),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32, device=DEVICE), "2:4", backend="triton")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), layer(x))
    with pytest.raises(ValueError, match="needs values"):
        ops.semi_structured_matmul(x[:, :60], values, metadata)
    with pytest.raises(TypeError, match="metadata must be int32"):
        ops.semi_structured_matmul(x, values, metadata.long())
    with pytest.raises(ValueError, match="activation"):
        ops.semi_structured_matmul(x, values, metadata, activation="relu")


def test_opcheck_backward_op_and_the_gelu_variant():
    # The dx op autograd calls and the forward that stores GELU's
    # pre-activation: schema, fake and autograd checks (test_aot_dispatch_dynamic
    # also runs the registered backward).
    x, values, metadata, bias = make_case(5, 32, 64, torch.float32)
    lk = torch.ops.lotus_kernels
    torch.library.opcheck(lk.semi_structured_matmul.default, (x.requires_grad_(), values.requires_grad_(), metadata, bias.requires_grad_(), "gelu", True))
    grad = torch.randn(5, 32, device=DEVICE)
    torch.library.opcheck(lk.semi_structured_matmul_dx.default, (grad, values.detach(), metadata, 64))


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_compiled_backward_matches_eager(activation):
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32, device=DEVICE), "2:4", backend="triton", activation=activation)
    assert_compiled_backward_matches_eager(layer, torch.randn(2, 5, 64, device=DEVICE))


def test_device_mismatch_is_a_clear_error():
    x, values, metadata, bias = make_case(5, 32, 64, torch.float32)
    # "meta" stands in for another device: the check runs before any kernel.
    for args, name in (((x, values, metadata, bias.to("meta")), "bias"), ((x, values, metadata.to("meta")), "metadata"), ((x, values.to("meta"), metadata), "values")):
        with pytest.raises(ValueError, match=f"{name} is on meta but x is on {x.device}"):
            ops.semi_structured_matmul(*args)


AOT_SCRIPT = r"""
import itertools
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from lotus_kernels.kernels import semi_structured_matmul as s

# fp32 compiles twice: "ieee" is the default (torch's "highest" fp32 matmul
# precision), "tf32" follows torch.set_float32_matmul_precision("high").
cases = [(d, "tf32") for d in ("fp16", "bf16", "fp32")] + [("fp32", "ieee")]
for arch, (dtype, precision) in itertools.product((80, 90), cases):
    sig = {"x_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "meta_ptr": "*i32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "pre_ptr": f"*{dtype}"}
    sig.update({n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_xk", "stride_ym", "stride_yn")})
    const = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "HAS_BIAS": True, "ACTIVATION": 1, "STORE_PRE": True, "INPUT_PRECISION": precision, "INTERPRETED": False}
    sig.update({n: "constexpr" for n in const})
    triton.compile(ASTSource(s._ss_matmul_kernel, sig, constexprs=const), target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})
    sig = {"dy_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "meta_ptr": "*i32", "dx_ptr": f"*{dtype}"}
    sig.update({n: "i32" for n in ("M", "N", "K", "stride_dym", "stride_dyn", "stride_dxm", "stride_dxk")})
    const = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "INPUT_PRECISION": precision, "INTERPRETED": False}
    sig.update({n: "constexpr" for n in const})
    triton.compile(ASTSource(s._ss_matmul_dx_kernel, sig, constexprs=const), target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})
print("compiled")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU machine the kernels run for real instead")
def test_gpu_path_compiles_for_sm80_and_sm90():
    compile_for_gpu(AOT_SCRIPT)  # see test_block_sparse_matmul.py: the interpreter never runs this path
