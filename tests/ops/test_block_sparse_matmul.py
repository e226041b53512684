"""Triton block-sparse matmul under TRITON_INTERPRET=1 (CPU): forward, backward, module, op registration.

Error bound in the flash-attention style: the kernel's error against an fp32
reference is at most twice that of PyTorch's same-precision dense run, plus a
small atol.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_compiled_backward_matches_eager, strided, compile_for_gpu, triton_device

from lotus_kernels import SparseLinear, backends, masks, ops
from lotus_kernels.kernels.block_sparse_matmul import block_sparse_matmul_ref

DEVICE = triton_device()
# fp32 gradients vs an fp64 reference: exact-ish in the interpreter; on GPU the bound also admits TF32 (torch "high" precision).
FP32_TOL = 1e-4 if DEVICE == "cpu" else 2e-2
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 needs a CUDA device")


def make_case(m, in_features, out_features, density, block_size, dtype, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    bh, bw = masks.block_shape(block_size)
    w = torch.randn(out_features, in_features, generator=g)
    blocks = (out_features // bh) * (in_features // bw)
    keep = torch.zeros(blocks, dtype=torch.bool)
    keep[torch.randperm(blocks, generator=g)[: round(density * blocks)]] = True
    mask = masks.expand_block_mask(keep.reshape(out_features // bh, in_features // bw), (bh, bw))
    crow, col, values = ops.dense_to_bsr(w.to(DEVICE, dtype), mask.to(DEVICE), (bh, bw))
    x = torch.randn(*lead, m, in_features, generator=g).to(DEVICE, dtype)
    bias = torch.randn(out_features, generator=g).to(DEVICE, dtype)
    return x, crow, col, values, bias


def assert_close_to_reference(got, x, crow, col, values, n, bias, activation, tolerance_scale=2.0):
    """Kernel error vs fp32 <= 2x (PyTorch same-precision error) + atol."""
    exact = block_sparse_matmul_ref(x.double(), crow, col, values.double(), n, None if bias is None else bias.double(), activation)
    # On GPU our fp32 path may use TF32 (when torch allows it): bound it by PyTorch doing the same.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = x.is_cuda
    try:
        torch_same_precision = block_sparse_matmul_ref(x, crow, col, values, n, bias, activation)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch_error = (torch_same_precision.double() - exact).abs().max().item()
    ours = (got.double() - exact).abs().max().item()
    atol = 1e-5 if x.dtype == torch.float32 else 1e-2
    assert ours <= tolerance_scale * torch_error + atol, (ours, torch_error)


@pytest.mark.parametrize("m", [1, 7, 65, 130])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_forward_and_backward_against_reference(m, density):
    x, crow, col, values, bias = make_case(m, 96, 64, density, 32, torch.float32)
    x.requires_grad_()
    values.requires_grad_()
    bias.requires_grad_()
    y = ops.block_sparse_matmul(x, values, crow, col, 64, bias)
    assert_close_to_reference(y, x.detach(), crow, col, values.detach(), 64, bias.detach(), "none")
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref, v_ref, b_ref = (t.detach().double().requires_grad_() for t in (x, values, bias))
    block_sparse_matmul_ref(x_ref, crow, col, v_ref, 64, b_ref).backward(grad.double())
    for got, expected in ((x.grad, x_ref.grad), (values.grad, v_ref.grad), (bias.grad, b_ref.grad)):
        assert got.shape == expected.shape
        assert torch.allclose(got.double(), expected, rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize(
    "in_features,out_features,block_size",
    [(64, 64, 16), (96, 192, 32), (192, 96, (16, 32)), (192, 64, (32, 16)), (64, 192, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shapes_blocks_and_dtypes(in_features, out_features, block_size, dtype):
    x, crow, col, values, bias = make_case(65, in_features, out_features, 0.5, block_size, dtype, lead=(2,))
    y = ops.block_sparse_matmul(x, values, crow, col, out_features, bias)
    assert y.shape == (2, 65, out_features) and y.dtype == dtype
    assert_close_to_reference(y, x, crow, col, values, out_features, bias, "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_gelu_forward_and_backward(dtype):
    x, crow, col, values, bias = make_case(33, 64, 96, 0.5, 16, dtype)
    y = ops.block_sparse_matmul(x, values, crow, col, 96, bias, "gelu")
    assert_close_to_reference(y, x, crow, col, values, 96, bias, "gelu")
    if dtype == torch.float32:
        x.requires_grad_()
        values.requires_grad_()
        bias.requires_grad_()
        ops.block_sparse_matmul(x, values, crow, col, 96, bias, "gelu").sum().backward()
        x_ref, v_ref, b_ref = (t.detach().double().requires_grad_() for t in (x, values, bias))
        block_sparse_matmul_ref(x_ref, crow, col, v_ref, 96, b_ref, "gelu").sum().backward()
        for got, expected in ((x.grad, x_ref.grad), (values.grad, v_ref.grad), (bias.grad, b_ref.grad)):
            assert torch.allclose(got.double(), expected, rtol=FP32_TOL, atol=FP32_TOL)


def test_empty_block_rows_write_bias_only_and_non_contiguous_x():
    x, crow, col, values, bias = make_case(7, 64, 64, 1.0, 16, torch.float32)
    keep = torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
    keep[1] = False  # block row 1 empty
    w = torch.randn(64, 64, device=DEVICE)
    crow, col, values = ops.dense_to_bsr(w, keep, 16)
    x_t = torch.randn(64, 7, device=DEVICE).t()  # non-contiguous [7, 64]
    y = ops.block_sparse_matmul(x_t, values, crow, col, 64, bias)
    assert torch.equal(y[:, 16:32], bias[16:32].expand(7, 16))
    assert_close_to_reference(y, x_t, crow, col, values, 64, bias, "none")


def test_no_bias_and_no_rows():
    x, crow, col, values, _ = make_case(0, 64, 64, 0.5, 16, torch.float32)
    assert ops.block_sparse_matmul(x, values, crow, col, 64).shape == (0, 64)
    x, crow, col, values, _ = make_case(5, 64, 64, 0.5, 16, torch.float32)
    assert_close_to_reference(ops.block_sparse_matmul(x, values, crow, col, 64), x, crow, col, values, 64, None, "none")


def assert_grads_within_bound(got, exact, torch_same, dtype, what):
    """Each of got (y and the gradients): error vs fp64 <= 2x PyTorch's same-precision error + atol."""
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, e, t in zip(what, got, exact, torch_same):
        assert g.dtype == dtype and g.shape == e.shape, (name, g.dtype, g.shape, e.shape)
        ours = (g.double() - e).abs().max().item()
        torch_error = (t.double() - e).abs().max().item()
        assert ours <= 2 * torch_error + atol, (name, ours, torch_error)


def forward_backward(x, values, bias, run, grad):
    """(y, dx, dvalues, dbias) of run(x, values, bias) for leaf copies of the inputs."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, values, bias)]
    y = run(*leaves)
    y.backward(grad.to(y.dtype))
    return (y.detach(),) + tuple(None if t is None else t.grad for t in leaves)


@pytest.mark.parametrize("how", ["transposed_back", "every_other"])
def test_non_contiguous_values_bias_and_indices_forward_and_backward(how):
    # The kernels index values, bias and the index tensors as packed arrays; a
    # strided view used to be read as if it were packed (max error ~26).
    x, crow, col, values, bias = make_case(7, 64, 64, 0.6, (16, 32), torch.float32, seed=3)
    structure = ops.block_sparse_structure(crow, col, 64, 64, (16, 32))
    # Strided index tensors: the public call (structure computed inside) and a given strided structure.
    crow_s, col_s = strided(crow), strided(col)
    structure_s = ops.BlockSparseStructure(*(strided(t) for t in structure))
    x_s, values_s, bias_s = strided(x, how), strided(values, how), strided(bias)
    grad = torch.randn(7, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    exact = forward_backward(x.double(), values.double(), bias.double(), lambda a, v, b: block_sparse_matmul_ref(a, crow, col, v, 64, b), grad.double())
    for kwargs in ({}, {"structure": structure_s}):
        leaves = [t.detach().requires_grad_() for t in (x_s, values_s, bias_s)]
        y = ops.block_sparse_matmul(leaves[0], leaves[1], crow_s, col_s, 64, leaves[2], **kwargs)
        y.backward(grad)
        for name, got, expected in zip(("y", "dx", "dvalues", "dbias"), (y.detach(),) + tuple(t.grad for t in leaves), exact):
            error = (got.double() - expected).abs().max().item()
            assert error <= FP32_TOL * (1 + expected.abs().max().item()), (name, "given structure" if kwargs else "structure computed", error)


BACKWARD_BLOCKS = [16, 32, 64, (16, 32), (32, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block_size", BACKWARD_BLOCKS, ids=lambda b: "x".join(map(str, masks.block_shape(b))))
def test_backward_over_block_shapes_and_dtypes(block_size, dtype):
    # dx walks W^T's structure with each block read transposed and dW is the
    # per-block SDD product: both depend on (bh, bw), so every shape is checked.
    x, crow, col, values, bias = make_case(24, 128, 64, 0.5, block_size, dtype, seed=5)
    grad = torch.randn(24, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    ours = forward_backward(x, values, bias, lambda a, v, b: ops.block_sparse_matmul(a, v, crow, col, 64, b), grad)
    ref = lambda a, v, b: block_sparse_matmul_ref(a, crow, col, v, 64, b)  # noqa: E731
    exact = forward_backward(x.double(), values.double(), bias.double(), ref, grad.double())
    torch_same = forward_backward(x, values, bias, ref, grad)
    assert_grads_within_bound(ours, exact, torch_same, dtype, ("y", "dx", "dvalues", "dbias"))


def test_fp16_gelu_backward_without_bias():
    x, crow, col, values, _ = make_case(24, 128, 64, 0.5, (16, 32), torch.float16, seed=7)
    grad = torch.randn(24, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.float16)
    ref = lambda a, v, b: block_sparse_matmul_ref(a, crow, col, v, 64, None, "gelu")  # noqa: E731
    ours = forward_backward(x, values, None, lambda a, v, b: ops.block_sparse_matmul(a, v, crow, col, 64, None, "gelu"), grad)
    exact = forward_backward(x.double(), values.double(), None, ref, grad.double())
    torch_same = forward_backward(x, values, None, ref, grad)
    assert ours[3] is None
    assert_grads_within_bound(ours[:3], exact[:3], torch_same[:3], torch.float16, ("y", "dx", "dvalues"))


@pytest.mark.parametrize("pattern_block", [16, (16, 32)])
def test_sparse_linear_triton_backend_matches_reference_and_trains(pattern_block):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64, device=DEVICE)
    triton_layer = SparseLinear.from_dense(linear, "block", sparsity=0.5, block_size=pattern_block, backend="triton")
    reference = SparseLinear.from_dense(linear, "block", sparsity=0.5, block_size=pattern_block, backend="reference")
    x = torch.randn(3, 11, 96, device=DEVICE)
    tolerance = 1e-5 if DEVICE == "cpu" else 2e-2  # TF32 tensor cores on GPU
    assert torch.allclose(triton_layer(x), reference(x), rtol=tolerance, atol=tolerance)
    optimizer = torch.optim.SGD(triton_layer.parameters(), lr=0.1)
    mask = triton_layer.mask()
    F.mse_loss(triton_layer(x), torch.zeros(3, 11, 64, device=DEVICE)).backward()
    optimizer.step()
    weight = triton_layer.to_dense()
    assert bool((weight[~mask] == 0).all()) and not torch.equal(weight, reference.to_dense())


def test_auto_on_cpu_keeps_the_reference_and_explicit_triton_needs_the_interpreter(monkeypatch):
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 64), "block", sparsity=0.5, block_size=16)
    assert backends.select_for(layer, torch.randn(2, 64), layer.spec()).name == "dense"
    # TRITON_INTERPRET is read once, at import (lotus_kernels._shared), as triton reads it.
    monkeypatch.setattr(backends.triton, "INTERPRET", False)
    reason = dict(backends.explain(layer.spec()))["triton"]
    assert "TRITON_INTERPRET=1" in reason
    layer.backend = "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer(torch.randn(2, 64))


def test_triton_declines_what_it_cannot_run():
    spec = backends.LayerSpec("block", torch.device("cuda"), torch.float16, (8, 32))
    assert "block sizes" in dict(backends.explain(spec))["triton"]
    spec = backends.LayerSpec("block", torch.device("cuda"), torch.float64, (32, 32))
    assert "dtype" in dict(backends.explain(spec))["triton"]
    spec = backends.LayerSpec("unstructured", torch.device("cuda"), torch.float16)
    assert "runs patterns 'block' and '2:4'" in dict(backends.explain(spec))["triton"]
    assert dict(backends.explain(backends.LayerSpec("block", torch.device("cuda"), torch.bfloat16, (64, 16))))["triton"] is None


def test_auto_on_cuda_times_once_per_shape_and_keeps_the_fastest(monkeypatch):
    monkeypatch.setattr(backends.linear, "_AUTO_CHOICE", {})
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 64), "block", sparsity=0.5, block_size=16)

    class FakeCudaInput:  # decision logic only: nothing runs
        device = torch.device("cuda")

        def __init__(self, *shape):
            self.shape = torch.Size(shape)

    spec = backends.LayerSpec("block", torch.device("cuda"), torch.float16, (16, 16))
    calls = []

    def timer(times):
        def time(backend, module, x):
            calls.append(backend.name)
            return times[backend.name]

        return time

    fast_triton = timer({"triton": 1.0, "dense": 2.0})
    assert backends.select_for(layer, FakeCudaInput(8, 197, 64), spec, fast_triton).name == "triton"
    assert sorted(calls) == ["dense", "triton"]
    # Same shape bucket (rows 1576 -> 2048): cached, no new timing.
    assert backends.select_for(layer, FakeCudaInput(1600, 64), spec, fast_triton).name == "triton"
    assert len(calls) == 2
    # Another bucket where dense wins: "dense" (cuBLAS on the cached dense weight) is chosen.
    assert backends.select_for(layer, FakeCudaInput(1, 64), spec, timer({"triton": 3.0, "dense": 2.0})).name == "dense"


def test_auto_decisions_persist_across_processes(monkeypatch, tmp_path):
    monkeypatch.setattr(backends.linear, "_AUTO_CHOICE", {})
    monkeypatch.setenv("LOTUS_AUTO_CACHE", "1")
    monkeypatch.setenv("LOTUS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backends.linear, "_device_key", lambda device: "Fake GPU | versions")
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 64), "block", sparsity=0.5, block_size=16)

    class FakeCudaInput:
        device = torch.device("cuda")
        shape = torch.Size((300, 64))

    spec = backends.LayerSpec("block", torch.device("cuda"), torch.float16, (16, 16), (64, 64))
    timed = []

    def timer(backend, module, x):
        timed.append(backend.name)
        return {"triton": 1.0, "dense": 2.0}[backend.name]

    assert backends.select_for(layer, FakeCudaInput(), spec, timer).name == "triton"
    saved = backends.saved_auto_choices()["Fake GPU | versions"]
    (entry,) = saved.values()
    assert entry == {"choice": "triton", "times_ms": {"triton": 1.0, "dense": 2.0}}
    # A "new process": the in-memory cache is empty, the file answers without timing.
    backends.linear._AUTO_CHOICE.clear()
    assert backends.select_for(layer, FakeCudaInput(), spec, timer).name == "triton"
    assert timed == ["triton", "dense"]
    # A corrupt file is measured again, not fatal.
    (tmp_path / "auto_choices.json").write_text("{not json")
    backends.linear._AUTO_CHOICE.clear()
    assert backends.select_for(layer, FakeCudaInput(), spec, timer).name == "triton"
    assert len(timed) == 4


@pytest.mark.parametrize(
    "call,exc,text",
    [
        (lambda c: ops.block_sparse_matmul(c[0].double(), c[3], c[1], c[2], 64), TypeError, "share a dtype"),
        (lambda c: ops.block_sparse_matmul(c[0], c[3], c[1], c[2], 64, activation="relu"), ValueError, "activation"),
        (lambda c: ops.block_sparse_matmul(c[0][:, :40], c[3], c[1], c[2], 64), ValueError, "multiples of the block"),
        (lambda c: ops.block_sparse_matmul(c[0][:, :16], c[3], c[1], c[2], 64), ValueError, "holds only 1 blocks"),
        (lambda c: ops.block_sparse_matmul(c[0][:, :32], c[3], c[1], c[2], 64, structure=ops.block_sparse_structure(c[1], c[2], 64, 64, (16, 16))), ValueError, "does not match the weight's in_features 64"),
        (lambda c: ops.block_sparse_matmul(c[0], c[3], c[1], c[2], 80), ValueError, "crow_indices must be"),
        (lambda c: ops.block_sparse_matmul(c[0], c[3], c[1], c[2], 64, c[4][:32]), ValueError, "bias must be"),
        (lambda c: ops.block_sparse_matmul(c[0], c[3][:, :8], c[1], c[2], 64), ValueError, "bh, bw in"),
        (lambda c: ops.block_sparse_matmul(c[0], c[3], c[1].float(), c[2], 64), TypeError, "must be int32 or int64"),
        # "meta" stands in for another device: the checks run before any kernel.
        (lambda c: ops.block_sparse_matmul(c[0], c[3], c[1], c[2], 64, c[4].to("meta")), ValueError, "bias is on meta"),
        (lambda c: ops.block_sparse_matmul(c[0], c[3], c[1].to("meta"), c[2], 64), ValueError, "crow_indices is on meta"),
        (lambda c: ops.block_sparse_matmul(c[0], c[3].to("meta"), c[1], c[2], 64), ValueError, "values is on meta"),
        (
            lambda c: ops.block_sparse_matmul(
                c[0], c[3], c[1], c[2], 64,
                structure=ops.block_sparse_structure(c[1], c[2], 64, 64, (16, 16))._replace(source_t=c[2].to("meta")),
            ),
            ValueError, "structure.source_t is on meta",
        ),
        (lambda c: ops.block_sparse_matmul(c[0], c[3], c[1], c[2], 64, structure=tuple(ops.block_sparse_structure(c[1], c[2], 64, 64, (16, 16)))), TypeError, "BlockSparseStructure"),
    ],
)
def test_bad_input(call, exc, text):
    case = make_case(5, 64, 64, 0.5, 16, torch.float32)
    with pytest.raises(exc) as info:
        call(case)
    assert text in str(info.value)


def test_opcheck_and_compile():
    x, crow, col, values, bias = make_case(9, 64, 64, 0.5, 16, torch.float32)
    structure = ops.block_sparse_structure(crow, col, 64, 64, (16, 16))
    args = (x, values.requires_grad_(), crow, col, *structure, bias, 64, "none", False)
    torch.library.opcheck(torch.ops.lotus_kernels.block_sparse_matmul.default, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 64, device=DEVICE), "block", sparsity=0.5, block_size=16, backend="triton")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 64, device=DEVICE)
    assert torch.allclose(compiled(x), layer(x))


def test_opcheck_backward_ops_and_the_gelu_variant():
    # The ops autograd calls (dx, SDD) and the forward that stores the
    # pre-activation for GELU's backward: schema, fake and autograd checks
    # (test_aot_dispatch_dynamic also runs the registered backward).
    x, crow, col, values, bias = make_case(5, 64, 32, 0.5, (16, 32), torch.float32)
    s = ops.block_sparse_structure(crow, col, 32, 64, (16, 32))
    grad = torch.randn(5, 32, device=DEVICE)
    lk = torch.ops.lotus_kernels
    torch.library.opcheck(lk.block_sparse_matmul.default, (x.requires_grad_(), values.requires_grad_(), crow, col, *s, bias.requires_grad_(), 32, "gelu", True))
    x, values, bias = x.detach(), values.detach(), bias.detach()
    torch.library.opcheck(lk.block_sparse_matmul_dx.default, (grad, values, s.crow_t, s.col_t, s.source_t, s.row_order_t, 64))
    torch.library.opcheck(lk.block_sparse_sdd.default, (grad, x, s.block_row, col, 16, 32))


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_compiled_backward_matches_eager(activation):
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32, device=DEVICE), "block", sparsity=0.5, block_size=(16, 32), backend="triton", activation=activation)
    assert_compiled_backward_matches_eager(layer, torch.randn(2, 5, 64, device=DEVICE))


def test_structure_by_hand():
    # W: 3 block rows x 2 block cols; stored blocks (0,1), (2,0), (2,1); block row 1 empty.
    crow = torch.tensor([0, 1, 1, 3])
    col = torch.tensor([1, 0, 1])
    s = ops.block_sparse_structure(crow, col, 48, 32, (16, 16))
    assert s.row_order.tolist() == [2, 0, 1]  # heaviest first, stable among ties
    assert s.crow_t.tolist() == [0, 1, 3] and s.col_t.tolist() == [2, 0, 2] and s.source_t.tolist() == [1, 0, 2]
    assert s.row_order_t.tolist() == [1, 0]
    assert s.block_row.tolist() == [0, 2, 2]


def test_triton_backend_in_a_timm_vit_with_fused_gelu():
    import copy

    import timm

    from lotus_kernels import SparsityConfig, sparsify_

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, num_classes=10).eval()
    model = model.to(DEVICE)
    reference = sparsify_(copy.deepcopy(model), SparsityConfig("block", 0.5, block_size=16, backend="reference"))
    fused = sparsify_(copy.deepcopy(model), SparsityConfig("block", 0.5, block_size=16, backend="triton", fuse_gelu=True))
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    assert fused.blocks[0].mlp.fc1.activation == "gelu"
    tolerance = 1e-4 if DEVICE == "cpu" else 3e-2  # TF32 on GPU
    assert torch.allclose(fused(x), reference(x), rtol=tolerance, atol=tolerance)


def test_triton_backend_under_autocast_computes_in_the_autocast_dtype():
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 64, device=DEVICE), "block", sparsity=0.5, block_size=16, backend="triton")
    x = torch.randn(5, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), layer(x), rtol=2e-2, atol=2e-2)


AOT_SCRIPT = r"""
import itertools, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from lotus_kernels.kernels import block_sparse_matmul as k

matmul_args = ["x_ptr", "values_ptr", "crow_ptr", "col_ptr", "source_ptr", "row_order_ptr", "bias_ptr", "y_ptr", "pre_ptr"]
ints = ["M", "stride_xm", "stride_xk", "stride_ym", "stride_yn", "M_BUCKET", "N", "K", "NNZ_BUCKET"]
# fp32 compiles twice: "ieee" is the default (torch's "highest" fp32 matmul
# precision), "tf32" follows torch.set_float32_matmul_precision("high").
cases = [(d, "tf32") for d in ("fp16", "bf16", "fp32")] + [("fp32", "ieee")]
for arch, (dtype, precision), transposed in itertools.product((80, 90), cases, (False, True)):
    signature = {name: ("*i64" if name in ("crow_ptr", "col_ptr", "source_ptr", "row_order_ptr") else f"*{dtype}") for name in matmul_args}
    signature.update({name: "i32" for name in ints})
    const = {"BH": 32, "BW": 64, "BLOCK_M": 64, "TRANSPOSED": transposed, "HAS_BIAS": True, "ACTIVATION": 1,
             "STORE_PRE": True, "INPUT_PRECISION": precision, "INTERPRETED": False}
    signature.update({name: "constexpr" for name in const})
    triton.compile(ASTSource(k._bsr_matmul_kernel, signature, constexprs=const), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": 4, "num_stages": 3})
    signature = {"dy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "row_ptr": "*i64", "col_ptr": "*i64", "dvalues_ptr": f"*{dtype}"}
    signature.update({name: "i32" for name in ("M", "M_PER_SPLIT", "stride_dym", "stride_dyn", "stride_xm", "stride_xk", "NNZ", "M_BUCKET", "NNZ_BUCKET", "SPLITS")})
    const = {"BH": 32, "BW": 64, "BLOCK_M": 128, "INPUT_PRECISION": precision, "INTERPRETED": False}
    signature.update({name: "constexpr" for name in const})
    for out in (dtype, "fp32"):  # dW itself, or the fp32 partials of a split M
        signature["dvalues_ptr"] = f"*{out}"
        triton.compile(ASTSource(k._bsr_sdd_kernel, signature, constexprs=const), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": 4, "num_stages": 3})
print("compiled")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU machine the kernels run for real instead")
def test_gpu_path_compiles_for_sm80_and_sm90():
    # The interpreter never runs the compiled path (pipelined for loops,
    # autotuned tiles, TF32 dots): compile it ahead of time for A100 and H100,
    # which needs no GPU, so a break shows here and not first on a GPU machine.
    compile_for_gpu(AOT_SCRIPT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdd_split_over_m_sums_the_same_gradient(dtype):
    # Few blocks and a long M: programs share each block's rows, fp32 partials summed once.
    from lotus_kernels.kernels import block_sparse_matmul as k

    g = torch.Generator().manual_seed(0)
    m, n, kk, b = 600, 32, 64, 16
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    x = torch.randn(m, kk, generator=g).to(DEVICE, dtype)
    block_row = torch.tensor([0, 0, 1, 1], device=DEVICE)
    col = torch.tensor([0, 3, 1, 2], device=DEVICE)
    exact = (dy.double().t() @ x.double()).reshape(n // b, b, kk // b, b).permute(0, 2, 1, 3)[block_row, col]
    one = k.bsr_sdd(dy, x, block_row, col, (b, b), splits=1)
    three = k.bsr_sdd(dy, x, block_row, col, (b, b), splits=3)  # 600 rows: slices of 256, 256, 88
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for got in (one, three):
        assert got.dtype == dtype and got.shape == (4, b, b)
        assert (got.double() - exact).abs().max().item() <= tolerance * (1 + exact.abs().max().item())
    # More splits than slices of 256 rows: no empty program, same answer.
    torch.testing.assert_close(k.bsr_sdd(dy, x, block_row, col, (b, b), splits=50), three, rtol=0, atol=1e-3 if dtype == torch.float16 else 1e-5)


def test_sdd_splits_fill_the_gpu_only_when_blocks_are_few(monkeypatch):
    from lotus_kernels.kernels import block_sparse_matmul as k

    class H100:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: H100)
    cuda = torch.device("cuda", 0)
    assert k.sdd_splits(50_000, 58, cuda) == 5  # ViT-B fc1, block 64, density 0.1: 58 blocks -> 290 programs
    assert k.sdd_splits(50_000, 2_000, cuda) == 1  # blocks alone fill the device
    assert k.sdd_splits(300, 4, cuda) == 2  # never more slices than 256-row pieces of M
    assert k.sdd_splits(50_000, 4, torch.device("cpu")) == 1
