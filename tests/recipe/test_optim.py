"""engine.optim: the warmup + cosine schedule and AdamW's parameter groups."""

import math

import lotus_kernels as lk
from lotus_kernels.recipe.engine import build_model, lr_at_step, param_groups

from tiny_runs import tiny


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=13)
    lrs = [lr_at_step(s, **kw) for s in range(13)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[-1], 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # decays monotonically
    assert math.isclose(lrs[8], 0.55)  # halfway through the cosine: the mean of lr and min_lr
    assert lr_at_step(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=1) == 1.0


def test_param_groups_decay_matrices_only():
    model = build_model(tiny(), 10)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed and "head.weight" in decayed
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= kept
    assert len(decayed) + len(kept) == len(names)
    # SparseLinear's compact values are decayed even when stored flat (unstructured: 1-D).
    lk.sparsify_(model, lk.SparsityConfig("unstructured", sparsity=0.5))
    decay, _ = param_groups(model, 0.05)
    assert any(p is model.blocks[0].attn.qkv.values for p in decay["params"])
    assert model.blocks[0].attn.qkv.values.ndim == 1
