"""Patch-dropping attention (Triton) under TRITON_INTERPRET=1: forward, backward and CLS attention
against the reference (gather, then fp32 softmax attention); index rules; op registration.

Error bound in the flash-attention style: the kernel's error against an fp64
reference is at most twice that of PyTorch's same-precision run, plus a small atol.
fp32 tolerances are tight where fp32 matmuls are exact (the interpreter; CUDA
at torch's default "highest" matmul precision, which the kernel follows) and
TF32-sized after torch.set_float32_matmul_precision("high").
"""

import math

import pytest
import torch
from conftest import compile_for_gpu, triton_device

from lotus_kernels import ops
from lotus_kernels.kernels.patch_drop_attention import patch_drop_attention_ref

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


def fp32_exact(device=DEVICE) -> bool:
    """Whether fp32 dots on device are full fp32: always on CPU (numpy in the interpreter, torch's CPU
    matmuls), on CUDA unless TF32 was allowed. Read at run time: a setting may change between tests."""
    return torch.device(device).type == "cpu" or torch.get_float32_matmul_precision() == "highest"


def fp32_atol(exact: float, tf32: float = 1e-2) -> float:
    """The fp32 tolerance for the kernel on DEVICE: exact where dots are full fp32, else TF32-sized."""
    return exact if fp32_exact() else tf32


def cls_atol() -> float:
    # CLS probabilities are at most 1; on CUDA exp2 is approximate (~2 ulp), hence 1e-5 there.
    return fp32_atol(1e-6 if DEVICE == "cpu" else 1e-5, 2e-3)


def max_err(got, expected) -> float:
    return (got.double() - expected).abs().max().item() if got.numel() else 0.0


def error_vs_exact(got, qkv, keep, h):
    """(our error, PyTorch's same-precision error) against the fp64 reference, for the output."""
    exact = patch_drop_attention_ref(qkv.double(), keep, h)
    return max_err(got, exact), max_err(patch_drop_attention_ref(qkv, keep, h), exact)


def assert_grads_close(qkv, keep, h, grad, got_grad, dtype, num_prefix_tokens=1):
    ref = qkv.detach().double().requires_grad_()
    patch_drop_attention_ref(ref, keep, h, num_prefix_tokens=num_prefix_tokens).backward(grad.double())
    if dtype != torch.float32 or not fp32_exact(got_grad.device):
        tol = 2e-2  # fp16/bf16, or TF32 dots
    else:
        # Full fp32: the interpreter's numpy is exact up to summation order; on
        # CUDA exp2/log2 are approximate (~2 ulp), so leave a little more room
        # (TF32 would miss this by two orders of magnitude).
        tol = 1e-5 if got_grad.device.type == "cpu" else 1e-4
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
    assert ours <= 2 * torch_err + fp32_atol(1e-5), (ours, torch_err)
    _, exact_cls = patch_drop_attention_ref(qkv.detach().double(), keep, h, return_cls_attention=True)
    assert max_err(cls, exact_cls) <= cls_atol()
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_grads_close(qkv, keep, h, grad, qkv.grad, qkv.dtype)


@pytest.mark.parametrize(
    "d,b,h,n,k",
    [
        (16, 3, 2, 65, 33),
        (32, 3, 2, 65, 33),
        (80, 3, 2, 65, 33),
        # The rest of the head dims at tiny sizes (the interpreter is slow):
        # 64 fills its tile exactly, 96 runs in a 128-wide tile with the tail
        # masked, 128 is the widest tile; K = N = 17 takes every token.
        (64, 1, 2, 33, 17),
        (96, 1, 3, 25, 13),
        (128, 1, 2, 17, 17),
    ],
)
def test_fp16_against_reference(d, b, h, n, k):
    # head_dim 80 runs in a 128-wide tile with the tail masked (like ViT-S/16's 64 and DeiT's 80/96).
    qkv = make_qkv(b, n, h, d, torch.float16, seed=d).requires_grad_()
    keep = make_keep(b, n, k, seed=d)
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
        # Another key order changes the online softmax's rescaling (and, with TF32, the rounding of p).
        assert torch.allclose(out[b, 1:][order[b]], out_s[b, 1:], atol=fp32_atol(1e-5))
        assert torch.allclose(cls[b][order[b]], cls_s[b], atol=cls_atol())


def test_identity_and_five_dim_and_strided_inputs():
    n, h, d = 17, 3, 16
    big = make_qkv(2, n, h, 2 * d)  # a strided view: every other column group
    qkv = big.view(2, n, 3, h, 2 * d)[..., :d]
    assert not qkv.is_contiguous()
    keep = make_keep(2, n, 9)
    got = ops.patch_drop_attention(qkv, keep, h, backend="triton")
    assert torch.allclose(got, patch_drop_attention_ref(qkv.contiguous(), keep, h), atol=fp32_atol(1e-5))
    full = ops.patch_drop_attention(qkv, None, h, backend="triton")
    assert full.shape == (2, n, h * d)
    assert torch.allclose(full, patch_drop_attention_ref(qkv.contiguous(), None, h), atol=fp32_atol(1e-5))
    everything = torch.arange(n, dtype=torch.int32, device=DEVICE).expand(2, n).contiguous()
    assert torch.allclose(ops.patch_drop_attention(qkv, everything, h, backend="triton"), full, atol=1e-6)


@pytest.mark.parametrize("wide", [False, True], ids=["one-block", "padding-blocks"])
def test_per_row_counts_with_padding(wide):
    # wide: K spans several query blocks (16 rows in the interpreter, at most 128
    # compiled), so row 1's later blocks are pure padding: those forward programs
    # skip the key loop and must still write zeros (out is allocated uninitialised).
    n, k = ((65, 40) if DEVICE == "cpu" else (197, 150)) if wide else (17, 9)
    h, d = 3, 16
    qkv = make_qkv(3, n, h, d).requires_grad_()
    keep = make_keep(3, n, k)
    keep[1, 5:] = -1  # row 1 keeps 5 tokens
    keep[2, 1:] = -1  # row 2 keeps only the CLS token
    out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
    ref, ref_cls = patch_drop_attention_ref(qkv.detach(), keep, h, return_cls_attention=True)
    assert torch.allclose(out, ref, atol=fp32_atol(1e-5)) and torch.allclose(cls, ref_cls, atol=cls_atol())
    assert torch.equal(out[1, 5:], torch.zeros_like(out[1, 5:])) and torch.equal(cls[1, 4:], torch.zeros_like(cls[1, 4:]))
    assert torch.equal(out[2, 1:], torch.zeros_like(out[2, 1:])) and torch.equal(cls[2], torch.zeros_like(cls[2]))
    # Each row's result equals running it alone with its own K.
    alone = ops.patch_drop_attention(qkv.detach()[1:2], keep[1:2, :5], h, backend="triton")
    assert torch.allclose(out[1:2, :5], alone, atol=fp32_atol(1e-6))
    # The log-sum-exp the backward reads: valid rows match the scores' (log2 units), padded rows hold 0.
    counts = (keep >= 0).sum(1, dtype=torch.int32)
    qkv5 = qkv.detach().view(3, n, 3, h, d)
    _, lse, _ = torch.ops.lotus_kernels.patch_drop_attention.default(qkv5, keep, counts, d**-0.5, 1, False)
    kept = qkv5.double().gather(1, keep.clamp_min(0).long()[:, :, None, None, None].expand(-1, -1, 3, h, d))
    scores = torch.einsum("bqhd,bkhd->bhqk", kept[:, :, 0], kept[:, :, 1]) * d**-0.5
    valid = keep >= 0
    ref_lse = scores.masked_fill(~valid[:, None, None, :], float("-inf")).logsumexp(-1) / math.log(2)
    rows = valid[:, None, :].expand_as(lse)
    assert torch.allclose(lse[rows].double(), ref_lse[rows], atol=fp32_atol(1e-5))
    assert torch.equal(lse[~rows], torch.zeros_like(lse[~rows]))
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_grads_close(qkv, keep, h, grad, qkv.grad, torch.float32)


def test_two_prefix_tokens():
    # CLS + one register token (timm's reg_tokens=1; or DeiT's CLS + distillation
    # token): both always kept, first; the CLS output covers the patches only but
    # is normalised over every kept token, the register included.
    n, h, d, p = 17, 3, 16, 2
    qkv = make_qkv(2, n, h, d, seed=5).requires_grad_()
    g = torch.Generator().manual_seed(5)
    patches = torch.stack([p + torch.randperm(n - p, generator=g)[:7] for _ in range(2)])
    keep = torch.cat([torch.arange(p).expand(2, p), patches], 1).to(DEVICE, torch.int32)
    keep[1, 6:] = -1  # row 1 keeps the prefix and 4 patches
    out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, num_prefix_tokens=p, backend="triton")
    assert out.shape == (2, 9, h * d) and cls.shape == (2, 7)
    ref, ref_cls = patch_drop_attention_ref(qkv.detach().double(), keep, h, return_cls_attention=True, num_prefix_tokens=p)
    assert max_err(out, ref) <= fp32_atol(1e-5) and max_err(cls, ref_cls) <= cls_atol()
    # The same softmax as with one prefix token, minus the register's slot (not renormalised without it).
    _, one_prefix = patch_drop_attention_ref(qkv.detach().double(), keep, h, return_cls_attention=True)
    assert max_err(cls, one_prefix[:, 1:]) <= cls_atol()
    assert torch.equal(cls[1, 4:], torch.zeros_like(cls[1, 4:]))
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_grads_close(qkv, keep, h, grad, qkv.grad, torch.float32, num_prefix_tokens=p)
    swapped = keep.clone()
    swapped[0, 1], swapped[0, 2] = swapped[0, 2].item(), 1  # the register token moved behind a patch
    with pytest.raises(ValueError, match="prefix"):
        ops.patch_drop_attention(qkv, swapped, h, num_prefix_tokens=p, backend="triton")


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter's dots are exact whatever the setting")
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_fp32_follows_torch_matmul_precision(precision):
    # "highest" (torch's default): full fp32 dots, errors at fp32 rounding;
    # "high": TF32 tensor cores, as torch's own fp32 matmuls then use.
    n, h, d = 65, 3, 32
    qkv = make_qkv(2, n, h, d, seed=7).requires_grad_()
    keep = make_keep(2, n, 33, seed=7)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert fp32_exact() == (precision == "highest")
        out, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
        grad = torch.randn_like(out)
        out.backward(grad)
        exact_out, exact_cls = patch_drop_attention_ref(qkv.detach().double(), keep, h, return_cls_attention=True)
        assert max_err(out, exact_out) <= fp32_atol(1e-5) and max_err(cls, exact_cls) <= cls_atol()
        assert_grads_close(qkv, keep, h, grad, qkv.grad, torch.float32)
    finally:
        torch.set_float32_matmul_precision(before)


def test_cls_attention_is_a_distribution_over_kept_tokens():
    n, h, d = 65, 3, 16
    qkv = make_qkv(2, n, h, d)
    keep = make_keep(2, n, 9)
    _, cls = ops.patch_drop_attention(qkv, keep, h, return_cls_attention=True, backend="triton")
    # Per head, row 0's probabilities over all kept tokens sum to 1; over patches (CLS excluded) to 1 - p(CLS).
    q, k, _ = qkv.view(2, n, 3, h, d).unbind(2)
    s = torch.einsum("bhd,bkhd->bhk", q[:, 0].double(), k.double().gather(1, keep.long()[:, :, None, None].expand(-1, -1, h, d))) * d**-0.5
    p = s.softmax(-1)
    assert torch.allclose(cls.double(), p[:, :, 1:].mean(1), atol=cls_atol())
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
    from lotus_kernels.backends import triton

    monkeypatch.setattr(triton, "INTERPRET", False)  # read once, at import, as triton reads it
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
from lotus_kernels.kernels import patch_drop_attention as k

# The most dynamic shared memory one block may use (opt-in): A100 163 KiB, H100 227 KiB.
SMEM = {80: 166912, 90: 232448}
fwd_ptrs = ["qkv_ptr", "idx_ptr", "count_ptr", "out_ptr", "lse_ptr", "cls_ptr"]
bwd_ptrs = ["qkv_ptr", "idx_ptr", "count_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dqkv_ptr"]
qkv_strides = ["stride_b", "stride_n", "stride_3", "stride_h", "stride_d", "stride_ib", "stride_ik"]


def ptr(name, dtype):
    if name in ("idx_ptr", "count_ptr"):
        return "*i32"
    return "*fp32" if name in ("lse_ptr", "cls_ptr", "delta_ptr") else f"*{dtype}"


def tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def by_area(configs):
    return sorted({tile(c) for c in configs}, key=lambda t: (t[0] * t[1], t[3], t[0]))


# The tiles the autotuner can pick: the largest (most shared memory and
# registers), and for fp32 "ieee" the smallest (its dots become FMA loops whose
# compile time grows with the tile: 5-40 s each at the big ones).
FWD, BWD = by_area(k._FWD_CONFIGS), by_area(k._BWD_CONFIGS)
BWD_LARGEST = [t for t in BWD if t[0] * t[1] == BWD[-1][0] * BWD[-1][1]]  # 64x128 and 128x64
assert len(BWD_LARGEST) == 2, BWD_LARGEST
DEFAULT = ((128, 64, 8, 3), (64, 64, 4, 2))
OFF_FWD, OFF_BWD = tile(k._FWD_CONFIGS[k._FWD_OFF]), tile(k._BWD_CONFIGS[k._BWD_OFF])
assert (OFF_FWD, OFF_BWD) == (FWD[0], BWD[0])  # the smallest tiles


def cases(arch):
    # (dtype, head_dim, identity, input_precision, forward tile, backward tile)
    out = []
    if arch == 80:
        out.append(("bf16", 80, False, "tf32", *DEFAULT))
    else:
        out += [("fp16", 80, False, "tf32", *DEFAULT), ("bf16", 80, False, "tf32", *DEFAULT),
                ("fp32", 80, False, "tf32", *DEFAULT), ("fp16", 64, True, "tf32", *DEFAULT)]
    # head_dim 96 and 128 share the 128-wide tile (96 masks its tail). fp16 and
    # bf16 have the same element size, so each takes one of the two largest
    # backward tiles: every (arch, head_dim, tile) combination is compiled once.
    for d in (96, 128):
        out.append(("fp16", d, False, "tf32", FWD[-1], BWD_LARGEST[0]))
        out.append(("bf16", d, False, "tf32", FWD[-1], BWD_LARGEST[1]))
    # Full-fp32 dots, the default for fp32 inputs on GPU (torch's "highest" matmul precision).
    out.append(("fp32", 64 if arch == 80 else 80, arch == 80, "ieee", FWD[0], BWD[0]))
    # The one tile LOTUS_AUTOTUNE=off (the CUDA test suite) runs must fit even at the largest footprint.
    out.append(("fp32", 128, False, "ieee", OFF_FWD, OFF_BWD))
    return out


def compile_one(kernel, sig, const, arch, t, dtype, d):
    m, n, warps, stages = t
    const = dict(const, D=d, BLOCK_D=k._block_d(d), BLOCK_M=m, BLOCK_N=n, INTERPRETED=False)
    sig = dict(sig, **{name: "constexpr" for name in const})
    ck = triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": warps, "num_stages": stages})
    # A tile that can never launch on this arch would be dead weight in the config list
    # (fp32 doubles the footprint, so its big tiles are expected not to fit: not checked, but for the tiles
    # LOTUS_AUTOTUNE=off runs alone, which must fit).
    if dtype != "fp32" or (kernel is k._pda_fwd_kernel and t == OFF_FWD) or (kernel is not k._pda_fwd_kernel and t == OFF_BWD):
        assert ck.metadata.shared <= SMEM[arch], (kernel.fn.__name__, arch, dtype, d, t, ck.metadata.shared)
    return ck


def run(arch):
    for dtype, d, identity, precision, fwd_tile, bwd_tile in cases(arch):
        sig = {name: ptr(name, dtype) for name in fwd_ptrs}
        sig.update({name: "i32" for name in ["H", "K"] + qkv_strides + ["stride_ob", "stride_ok", "stride_oh", "stride_od"]})
        sig.update({"qk_scale": "fp32", "K_BUCKET": "i32"})
        const = {"IDENTITY": identity, "CLS": True, "NUM_PREFIX": 1, "INPUT_PRECISION": precision}
        compile_one(k._pda_fwd_kernel, sig, const, arch, fwd_tile, dtype, d)
        for kernel in (k._pda_bwd_dkdv_kernel, k._pda_bwd_dq_kernel):
            sig = {name: ptr(name, dtype) for name in bwd_ptrs}
            sig.update({name: "i32" for name in ["H", "K"] + qkv_strides + ["stride_dob", "stride_dok", "stride_doh", "stride_dod",
                                                                            "stride_gb", "stride_gn", "stride_g3", "stride_gh", "stride_gd"]})
            sig.update({"qk_scale": "fp32", "sm_scale": "fp32", "K_BUCKET": "i32"})
            const = {"IDENTITY": identity, "INPUT_PRECISION": precision}
            compile_one(kernel, sig, const, arch, bwd_tile, dtype, d)
    print("compiled")
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU machine the kernels run for real instead")
@pytest.mark.parametrize("arch", [80, 90])
def test_gpu_path_compiles_for_sm80_and_sm90(arch):
    # The interpreter never runs the compiled path (pipelined loops, autotuned
    # tiles, TF32 and full-fp32 dots, the early-exit branches): compile it ahead
    # of time for A100 and H100, which needs no GPU, at the largest tiles the
    # autotuner can pick for head_dim 96/128, and check their shared memory fits.
    compile_for_gpu(f"{AOT_SCRIPT}\nrun({arch})\n")
