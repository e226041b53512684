"""enable_patch_dropping_ on timm ViTs: kept-token semantics against hand-written references,
keep_ratio 1.0 == the timm model, disable restores it, sparsify_ and torch.compile work together.

fp32 tolerances assume full-fp32 matmuls (the CPU; CUDA at torch's default
"highest" precision, which the kernel follows); with TF32 allowed
(torch.set_float32_matmul_precision("high")) they widen to TF32 sizes.
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import triton_device

from lotus_kernels import SparsityConfig, densify_, sparsify_
from lotus_kernels.nn import SparseLinear
from lotus_kernels.nn.patch_dropping import (
    PatchDropAttention,
    PatchDropBlock,
    TicketDropout,
    disable_patch_dropping_,
    enable_patch_dropping_,
    is_patch_dropping,
    num_kept,
    use_tickets,
)

DEVICE = triton_device()
BACKENDS = ["sdpa", "reference", "triton"]
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 needs a CUDA device")


def atol(exact: float = 1e-5, tf32: float = 5e-2) -> float:
    """exact where fp32 matmuls on DEVICE are full fp32, tf32 after TF32 was allowed (read at run time)."""
    return exact if DEVICE == "cpu" or torch.get_float32_matmul_precision() == "highest" else tf32


def tiny_vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    # 32x32 images, patch 8: 16 patches + CLS = 17 tokens; 3 heads of 16.
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval().to(DEVICE)


def images(b=3, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def tokens_before_blocks(model, x):
    x = model._pos_embed(model.patch_embed(x))
    return x


def head(model, x):
    return model.forward_head(model.norm(x))


def reference_attention(attn, x, keep=None, prefix=1):
    """timm's attention math on the kept tokens only (keys and queries), in fp32; and the CLS row over the patches."""
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    if keep is not None:
        qkv = qkv.gather(1, keep[:, :, None, None, None].expand(-1, -1, 3, attn.num_heads, attn.head_dim))
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    p = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
    out = (p @ v).transpose(1, 2).flatten(2)
    return attn.proj(out), p[:, :, 0, prefix:].mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("drop_at", ["input", (1, 2)])
def test_keep_ratio_one_reproduces_timm(backend, drop_at):
    model = tiny_vit()
    expected = model(images())
    enable_patch_dropping_(model, 1.0, drop_at=drop_at, backend=backend)
    assert torch.allclose(model(images()), expected, atol=atol())


def prefix_tokens(b, p):
    """[B, p] int64: the prefix token positions 0..p-1 (CLS, then registers), kept first in every row."""
    return torch.arange(p, device=DEVICE).expand(b, p)


# reg_tokens=1: CLS + one register token, two prefix tokens (timm's num_prefix_tokens = 2).
REG_TOKENS = pytest.mark.parametrize("reg_tokens", [0, 1], ids=["cls", "cls+reg"])


@REG_TOKENS
@pytest.mark.parametrize("backend", BACKENDS)
def test_given_tickets_equal_gathering_before_the_blocks(backend, reg_tokens):
    model = tiny_vit(reg_tokens=reg_tokens)
    p = 1 + reg_tokens
    assert model.num_prefix_tokens == p
    reference = copy.deepcopy(model)
    x = images()
    tickets = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:8] for i in range(3)]).to(DEVICE)
    enable_patch_dropping_(model, 0.5, selector="given", backend=backend)
    with use_tickets(model, tickets):
        got = model(x)
    tokens = tokens_before_blocks(reference, x)
    keep = torch.cat([prefix_tokens(3, p), p + tickets.sort(1).values], 1)
    kept = tokens.gather(1, keep[:, :, None].expand(-1, -1, tokens.shape[-1]))
    expected = head(reference, reference.blocks(reference.norm_pre(kept)))
    assert torch.allclose(got, expected, atol=atol())


def test_random_input_dropping_keeps_ceil_ratio_and_the_cls_token():
    model = tiny_vit()
    enable_patch_dropping_(model, 0.3)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    cls_seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: cls_seen.append(args[0][:, 0].clone()))
    torch.manual_seed(0)
    model(images())
    assert seen == [torch.Size([3, 1 + num_kept(0.3, 16), 48])] and num_kept(0.3, 16) == 5
    tokens = tokens_before_blocks(model, images())
    assert torch.allclose(cls_seen[0], tokens[:, 0])  # the CLS token is always kept, first


@REG_TOKENS
@pytest.mark.parametrize("backend", BACKENDS)
def test_cls_attention_dropping_at_blocks_against_reference(backend, reg_tokens):
    model = tiny_vit(reg_tokens=reg_tokens)
    p = 1 + reg_tokens
    reference = copy.deepcopy(model)
    x = images()
    enable_patch_dropping_(model, 0.5, drop_at=(1, 3), backend=backend)
    got = model(x)

    h = reference.norm_pre(tokens_before_blocks(reference, x))
    for i, block in enumerate(reference.blocks):
        normed = block.norm1(h)
        if i in (1, 3):
            # The CLS row over all current tokens (registers included), scored over the patches only.
            _, cls = reference_attention(block.attn, normed, prefix=p)
            k = num_kept(0.5, h.shape[1] - p)
            keep = torch.cat([prefix_tokens(3, p), p + cls.topk(k, 1).indices.sort(1).values], 1)
            attn_out, _ = reference_attention(block.attn, normed, keep)
            h = h.gather(1, keep[:, :, None].expand(-1, -1, h.shape[-1])) + attn_out
        else:
            h = h + reference_attention(block.attn, normed)[0]
        h = h + block.mlp(block.norm2(h))
    assert h.shape[1] == p + 4  # 16 -> 8 -> 4 patches; the prefix tokens stay
    assert torch.allclose(got, head(reference, h), atol=atol())


def test_training_on_tickets_backward_matches_sdpa():
    x = images()
    tickets = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:8] for i in range(3)]).to(DEVICE)
    grads = {}
    for backend in ("sdpa", "triton"):
        model = tiny_vit().train()
        enable_patch_dropping_(model, 0.5, selector="given", backend=backend)
        with use_tickets(model, tickets):
            F.cross_entropy(model(x), torch.arange(3, device=DEVICE)).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["triton"].keys() and len(grads["sdpa"]) > 10
    for name, g in grads["sdpa"].items():
        assert torch.allclose(grads["triton"][name], g, atol=atol()), name


def test_disable_restores_the_timm_model_and_state_dict_keys_are_unchanged():
    model = tiny_vit()
    keys = list(model.state_dict())
    classes = [type(b).__name__ for b in model.blocks]
    expected = model(images())
    enable_patch_dropping_(model, 0.5, drop_at=(2,))
    assert is_patch_dropping(model)
    assert list(model.state_dict()) == keys
    assert all(isinstance(b, PatchDropBlock) and isinstance(b.attn, PatchDropAttention) for b in model.blocks)
    enable_patch_dropping_(model, 0.5, selector="given")  # reconfiguring replaces, never nests
    assert isinstance(model.patch_drop, TicketDropout) and not isinstance(model.blocks[0].attn.qkv, PatchDropAttention)
    disable_patch_dropping_(model)
    assert not is_patch_dropping(model)
    assert [type(b).__name__ for b in model.blocks] == classes and type(model.patch_drop).__name__ != "TicketDropout"
    assert torch.equal(model(images()), expected)


def test_works_together_with_sparsify():
    model = tiny_vit()
    enable_patch_dropping_(model, 0.5, drop_at=(1,))
    sparsify_(model, SparsityConfig(pattern="unstructured", sparsity=0.5))
    assert isinstance(model.blocks[0].attn.qkv, SparseLinear) and isinstance(model.blocks[0].mlp.fc1, SparseLinear)
    got = model(images())
    # The fake-sparse model: the same dense weights with zeros, dropping the same way.
    fake = densify_(copy.deepcopy(model))
    assert torch.allclose(got, fake(images()), atol=atol())
    disable_patch_dropping_(model)  # the sparse layers survive the restore
    assert isinstance(model.blocks[0].attn.qkv, SparseLinear) and isinstance(model.blocks[3].mlp.fc2, SparseLinear)
    assert not isinstance(model.blocks[0], PatchDropBlock)


@pytest.mark.parametrize("drop_at", ["input", (1, 2)])
def test_compiles_without_graph_break(drop_at):
    model = tiny_vit()
    enable_patch_dropping_(model, 0.5, drop_at=drop_at, selector="random" if drop_at == "input" else None, backend="triton")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = images()
    if drop_at == "input":
        torch.manual_seed(3)
        got = compiled(x)
        torch.manual_seed(3)
        expected = model(x)
    else:
        got, expected = compiled(x), model(x)
    assert torch.allclose(got, expected, atol=atol())


def test_records_the_cls_attention_of_a_block():
    model = tiny_vit()
    enable_patch_dropping_(model, 1.0, backend="triton")
    model.blocks[2].attn.record_cls_attention = True
    model(images())
    cls = model.blocks[2].attn.last_cls_attention
    reference = copy.deepcopy(model)
    disable_patch_dropping_(reference)
    h = reference.norm_pre(tokens_before_blocks(reference, images()))
    for block in reference.blocks[:2]:
        h = block(h)
    _, expected = reference_attention(reference.blocks[2].attn, reference.blocks[2].norm1(h))
    assert cls.shape == (3, 16) and torch.allclose(cls, expected, atol=atol(1e-6, 2e-3))


def test_bad_configurations_raise():
    model = tiny_vit()
    for ratio in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="keep_ratio"):
            enable_patch_dropping_(model, ratio)
    with pytest.raises(ValueError, match="drop_at"):
        enable_patch_dropping_(model, 0.5, drop_at=(4,))
    with pytest.raises(ValueError, match="drop_at"):
        enable_patch_dropping_(model, 0.5, drop_at="middle")
    with pytest.raises(ValueError, match="selector='cls_attention' at drop_at='input'"):
        enable_patch_dropping_(model, 0.5, selector="cls_attention")
    with pytest.raises(ValueError, match="selector='given'"):
        enable_patch_dropping_(model, 0.5, drop_at=(1,), selector="given")
    with pytest.raises(ValueError, match="selector must be"):
        enable_patch_dropping_(model, 0.5, selector="topk")
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        enable_patch_dropping_(torch.nn.Linear(3, 3), 0.5)
    assert not is_patch_dropping(model)  # nothing half-applied


def test_bad_tickets_raise():
    model = tiny_vit()
    with pytest.raises(ValueError, match="selector='given'"):
        with use_tickets(model, torch.zeros(3, 8, dtype=torch.long)):
            pass
    enable_patch_dropping_(model, 0.5, selector="given")
    with pytest.raises(RuntimeError, match="use_tickets"):
        model(images())
    with pytest.raises(ValueError, match="out of|in \\[0, 16\\)"):
        with use_tickets(model, torch.full((3, 8), 16, device=DEVICE)):
            pass
    dup = torch.arange(8, device=DEVICE).repeat(3, 1)
    dup[0, 1] = 0
    with pytest.raises(ValueError, match="twice"):
        with use_tickets(model, dup):
            pass
    with pytest.raises(ValueError, match="tickets must be"):
        with use_tickets(model, torch.arange(5, device=DEVICE).repeat(3, 1)):
            model(images())
    with pytest.raises(TypeError, match="tickets"):
        with use_tickets(model, torch.zeros(3, 8)):
            pass


def test_num_kept_is_ceil_of_the_ratio():
    assert [num_kept(r, 10) for r in (0.05, 0.1, 0.15, 0.7, 1.0)] == [1, 1, 2, 7, 10]
    assert num_kept(0.5, 64) == 32 and num_kept(0.5, 196) == 98 and num_kept(0.25, 0) == 0
