"""Patch-dropping attention (Triton) under TRITON_INTERPRET=1: forward, backward and CLS attention
against the reference (gather, then fp32 softmax attention); index rules; op registration.

Error bound in the flash-attention style: the kernel's error against an fp64
reference is at most twice that of PyTorch's same-precision run, plus a small atol.
"""

import pytest
import torch
from conftest import compile_for_gpu, triton_device

from lotus_kernels import ops
from lotus_kernels.triton.patch_drop_attention import patch_drop_attention_ref

DEVICE = triton_device()
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 needs a CUDA device")


def make_qkv(b, n, h, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3 * h * d, generator=g).to(DEVICE, dtype)


def make_keep(b, n, k, seed=0, sort=False):
    """[B, K] int32: CLS (0) first, then K-1 distinct random patches (unsorted unless sort)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        patches = 1 + torch.randperm(n - 1, generator=g)[: k - 1]
        rows.append(torch.cat([torch.zeros(1, dtype=torch.long), patches.sort().values if sort else patches]))
    return torch.stack(rows).to(DEVICE, torch.int32)


def max_err(got, expected) -> float:
    return (got.double() - expected).abs().max().item() if got.numel() else 0.0


def error_vs_exact(got, qkv, keep, h):
    """(our error, PyTorch's same-precision error) against the fp64 reference, for the output."""
    exact = patch_drop_attention_ref(qkv.double(), keep, h)
    return max_err(got, exact), max_err(patch_drop_attention_ref(qkv, keep, h), exact)


def assert_grads_close(qkv, keep, h, grad, got_grad, dtype):
    ref = qkv.detach().double().requires_grad_()
    patch_drop_attention_ref(ref, keep, h).backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else 2e-2
    assert got_grad.shape == ref.grad.shape
    assert torch.allclose(got_grad.double(), ref.grad, rtol=tol, atol=tol), (got_grad.double() - ref.grad).abs().max()


@pytest.mark.parametrize("n", [17, 65])
@pytest.mark.parametrize("k", [1, 9, "N"])
@pytest.mark.parametrize("h,d", [(1, 16), (3, 32), (3, 16)])
def test_forward_backward_and_cls_against_reference(n, k, h, d):
    k = n if k == "N" else k
    qkv = make_qkv(2, n, h, d, seed=n + k).requires_grad_()
    keep = make_keep(2, n, k, seed=k)
    out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
    assert out.shape == (2, k, h * d) and out.dtype == qkv.dtype
    assert cls.shape == (2, k - 1) and cls.dtype == torch.float32
    ours, torch_err = error_vs_exact(out, qkv.detach(), keep, h)
    assert ours <= 2 * torch_err + 1e-5, (ours, torch_err)
    _, exact_cls = patch_drop_attention_ref(qkv.detach().double(), keep, h, return_cls_attention=True)
    assert max_err(cls, exact_cls) <= (1e-6 if DEVICE == "cpu" else 2e-3)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_grads_close(qkv, keep, h, grad, qkv.grad, qkv.dtype)


@pytest.mark.parametrize("d", [16, 32, 80])
def test_fp16_against_reference(d):
    # head_dim 80 runs in a 128-wide tile with the tail masked (like ViT-S/16's 64 and DeiT's 80/96).
    h, n, k = 2, 65, 33
    qkv = make_qkv(3, n, h, d, torch.float16, seed=d).requires_grad_()
    keep = make_keep(3, n, k, seed=d)
    out = ops.patch_drop_attention(qkv, keep, h, backend="triton")
    ours, torch_err = error_vs_exact(out, qkv.detach(), keep, h)
    assert ours <= 2 * torch_err + 1e-3, (ours, torch_err)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = qkv.detach().double().requires_grad_()
    patch_drop_attention_ref(ref, keep, h).backward(grad.double())
    same = qkv.detach().clone().requires_grad_()
    patch_drop_attention_ref(same, keep, h).backward(grad)
    torch_grad_err = (same.grad.double() - ref.grad).abs().max().item()
    assert (qkv.grad.double() - ref.grad).abs().max().item() <= 2 * torch_grad_err + 2e-3


def test_dropped_tokens_get_exactly_zero_gradient():
    n, h, d = 17, 3, 16
    qkv = make_qkv(2, n, h, d).requires_grad_()
    keep = make_keep(2, n, 5)
    ops.patch_drop_attention(qkv, keep, h, backend="triton").sum().backward()
    grad = qkv.grad.view(2, n, 3, h, d)
    for b in range(2):
        dropped = sorted(set(range(n)) - set(keep[b].tolist()))
        assert torch.equal(grad[b, dropped], torch.zeros_like(grad[b, dropped]))
        assert grad[b, keep[b].long()].abs().sum() > 0


def test_unsorted_order_permutes_rows():
    n, h, d = 65, 3, 16
    qkv = make_qkv(2, n, h, d)
    keep = make_keep(2, n, 9)
    sorted_keep = torch.cat([keep[:, :1], keep[:, 1:].sort(1).values], 1)
    out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
    out_s, cls_s = ops.patch_drop_attention(qkv, sorted_keep, h, return_cls_attention=True, backend="triton")
    order = keep[:, 1:].long().argsort(1)  # unsorted slot -> sorted position
    for b in range(2):
        assert torch.allclose(out[b, 1:][order[b]], out_s[b, 1:], atol=1e-5)
        assert torch.allclose(cls[b][order[b]], cls_s[b], atol=1e-6)


def test_identity_and_five_dim_and_strided_inputs():
    n, h, d = 17, 3, 16
    big = make_qkv(2, n, h, 2 * d)  # a strided view: every other column group
    qkv = big.view(2, n, 3, h, 2 * d)[..., :d]
    assert not qkv.is_contiguous()
    keep = make_keep(2, n, 9)
    got = ops.patch_drop_attention(qkv, keep, h, backend="triton")
    assert torch.allclose(got, patch_drop_attention_ref(qkv.contiguous(), keep, h), atol=1e-5)
    full = ops.patch_drop_attention(qkv, None, h, backend="triton")
    assert full.shape == (2, n, h * d)
    assert torch.allclose(full, patch_drop_attention_ref(qkv.contiguous(), None, h), atol=1e-5)
    everything = torch.arange(n, dtype=torch.int32, device=DEVICE).expand(2, n).contiguous()
    assert torch.allclose(ops.patch_drop_attention(qkv, everything, h, backend="triton"), full, atol=1e-6)


def test_per_row_counts_with_padding():
    n, h, d = 17, 3, 16
    qkv = make_qkv(3, n, h, d).requires_grad_()
    keep = make_keep(3, n, 9)
    keep[1, 5:] = -1  # row 1 keeps 5 tokens
    keep[2, 1:] = -1  # row 2 keeps only the CLS token
    out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
    ref, ref_cls = patch_drop_attention_ref(qkv.detach(), keep, h, return_cls_attention=True)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(cls, ref_cls, atol=1e-6)
    assert torch.equal(out[1, 5:], torch.zeros_like(out[1, 5:])) and torch.equal(cls[1, 4:], torch.zeros_like(cls[1, 4:]))
    # Each row's result equals running it alone with its own K.
    alone = ops.patch_drop_attention(qkv.detach()[1:2], keep[1:2, :5], h, backend="triton")
    assert torch.allclose(out[1:2, :5], alone, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_grads_close(qkv, keep, h, grad, qkv.grad, torch.float32)


def test_cls_attention_is_a_distribution_over_kept_tokens():
    n, h, d = 65, 3, 16
    qkv = make_qkv(2, n, h, d)
    keep = make_keep(2, n, 9)
    _, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
    # Per head, row 0's probabilities over all kept tokens sum to 1; over patches (CLS excluded) to 1 - p(CLS).
    q, k, _ = qkv.view(2, n, 3, h, d).unbind(2)
    s = torch.einsum("bhd,bkhd->bhk", q[:, 0].double(), k.double().gather(1, keep.long()[:, :, None, None].expand(-1, -1, h, d))) * d**-0.5
    p = s.softmax(-1)
    assert torch.allclose(cls.double(), p[:, :, 1:].mean(1), atol=1e-6)
    assert torch.all(cls >= 0) and torch.all(cls.sum(1) < 1)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_torch_backends_match(backend):
    n, h, d = 17, 3, 16
    qkv = make_qkv(2, n, h, d).cpu().requires_grad_()
    keep = make_keep(2, n, 9).cpu()
    keep[1, 6:] = -1
    out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend=backend)
    ref, ref_cls = patch_drop_attention_ref(qkv.detach(), keep, h, return_cls_attention=True)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(cls, ref_cls, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_grads_close(qkv, keep, h, grad, qkv.grad, torch.float32)


def test_auto_uses_sdpa_on_cpu():
    qkv = make_qkv(2, 17, 3, 16).cpu()
    keep = make_keep(2, 17, 9).cpu()
    assert torch.allclose(ops.patch_drop_attention(qkv, keep, 3), patch_drop_attention_ref(qkv, keep, 3), atol=1e-5)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda k: k.__setitem__((0, 3), int(k[0, 2])), "twice"),
        (lambda k: k.__setitem__((1, 4), 17), "out of range"),
        (lambda k: k.__setitem__((1, 4), -2), "negative"),
        (lambda k: k.__setitem__((0, 2), -1), "padding before"),
        (lambda k: k.__setitem__((0, 0), 5), "prefix"),
    ],
)
def test_bad_indices_raise(edit, match):
    qkv = make_qkv(2, 17, 3, 16)
    keep = make_keep(2, 17, 9)
    edit(keep)
    with pytest.raises(ValueError, match=match):
        ops.patch_drop_attention(qkv, keep, 3, backend="triton")


def test_bad_arguments_raise():
    qkv = make_qkv(2, 17, 3, 16)
    keep = make_keep(2, 17, 9)
    with pytest.raises(ValueError, match="num_heads"):
        ops.patch_drop_attention(qkv, keep, 5)
    with pytest.raises(ValueError, match="backend"):
        ops.patch_drop_attention(qkv, keep, 3, backend="flash")
    with pytest.raises(TypeError, match="keep_idx must be int32 or int64"):
        ops.patch_drop_attention(qkv, keep.float(), 3)
    with pytest.raises(ValueError, match=r"keep_idx must be \[B=2, K\]"):
        ops.patch_drop_attention(qkv, keep[:1], 3)
    with pytest.raises(ValueError, match="keep_idx must be"):
        ops.patch_drop_attention(qkv, torch.zeros(2, 18, dtype=torch.int32, device=DEVICE), 3)
    with pytest.raises(TypeError, match="qkv must be"):
        ops.patch_drop_attention(qkv.double(), keep, 3)
    with pytest.raises(ValueError, match="scale"):
        ops.patch_drop_attention(qkv, keep, 3, scale=-1.0)
    with pytest.raises(ValueError, match="CLS token"):
        ops.patch_drop_attention(qkv, keep, 3, return_cls_attention=True, num_prefix_tokens=0)


def test_triton_on_plain_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.patch_drop_attention(torch.randn(1, 5, 3 * 16), None, 1, backend="triton")


def test_compiles_without_graph_break():
    n, h, d = 17, 3, 16
    qkv = make_qkv(2, n, h, d).requires_grad_()
    keep = make_keep(2, n, 9)

    def f(qkv, keep):
        out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
        return out.sum() + cls.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(qkv, keep).backward()
    grad = qkv.grad.clone()
    qkv.grad = None
    f(qkv, keep).backward()
    assert torch.allclose(grad, qkv.grad, atol=1e-6)


def test_opcheck():
    qkv = make_qkv(2, 17, 3, 16).view(2, 17, 3, 3, 16).requires_grad_()
    keep = make_keep(2, 17, 9)
    counts = torch.full((2,), 9, dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(
        torch.ops.lotus_kernels.patch_drop_attention.default, (qkv, keep, counts, 0.25, 1, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


AOT_SCRIPT = r"""
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from lotus_kernels.triton import patch_drop_attention as k

fwd_ptrs = ["qkv_ptr", "idx_ptr", "count_ptr", "out_ptr", "lse_ptr", "cls_ptr"]
bwd_ptrs = ["qkv_ptr", "idx_ptr", "count_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dqkv_ptr"]
qkv_strides = ["stride_b", "stride_n", "stride_3", "stride_h", "stride_d", "stride_ib", "stride_ik"]
def ptr(name, dtype):
    if name in ("idx_ptr", "count_ptr"):
        return "*i32"
    return "*fp32" if name in ("lse_ptr", "cls_ptr", "delta_ptr") else f"*{dtype}"
cases = [(80, "bf16", 80, 128, False), (90, "fp16", 80, 128, False), (90, "bf16", 80, 128, False), (90, "fp32", 80, 128, False),
         (90, "fp16", 64, 64, True)]
for arch, dtype, d, block_d, identity in cases:
    sig = {name: ptr(name, dtype) for name in fwd_ptrs}
    sig.update({name: "i32" for name in ["H", "K"] + qkv_strides + ["stride_ob", "stride_ok", "stride_oh", "stride_od"]})
    sig.update({"qk_scale": "fp32", "K_BUCKET": "i32"})
    const = {"D": d, "BLOCK_D": block_d, "BLOCK_M": 128, "BLOCK_N": 64, "IDENTITY": identity, "CLS": True,
             "NUM_PREFIX": 1, "INPUT_PRECISION": "tf32", "INTERPRETED": False}
    sig.update({name: "constexpr" for name in const})
    triton.compile(ASTSource(k._pda_fwd_kernel, sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": 8, "num_stages": 3})
    for kernel in (k._pda_bwd_dkdv_kernel, k._pda_bwd_dq_kernel):
        sig = {name: ptr(name, dtype) for name in bwd_ptrs}
        sig.update({name: "i32" for name in ["H", "K"] + qkv_strides + ["stride_dob", "stride_dok", "stride_doh", "stride_dod",
                                                                        "stride_gb", "stride_gn", "stride_g3", "stride_gh", "stride_gd"]})
        sig.update({"qk_scale": "fp32", "sm_scale": "fp32", "K_BUCKET": "i32"})
        const = {"D": d, "BLOCK_D": block_d, "BLOCK_M": 64, "BLOCK_N": 64, "IDENTITY": identity,
                 "INPUT_PRECISION": "tf32", "INTERPRETED": False}
        sig.update({name: "constexpr" for name in const})
        triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": 4, "num_stages": 2})
print("compiled")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU machine the kernels run for real instead")
def test_gpu_path_compiles_for_sm80_and_sm90():
    # The interpreter never runs the compiled path (pipelined loops, autotuned
    # tiles, TF32 dots, the early-exit branches): compile it ahead of time for
    # A100 and H100, which needs no GPU.
    compile_for_gpu(AOT_SCRIPT)
