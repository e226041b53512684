"""sparsify_ / densify_ on timm ViT and DeiT models (pretrained=False)."""

import copy
import io

import pytest
import timm
import torch
import torch.nn as nn

import lotus_kernels as lk
from lotus_kernels import SparseLinear, SparsityConfig, densify_, masks, sparsify_, sparsity_summary


def vit(name="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def small_vit():
    """A 32x32 ViT with 4x4 patches (65 tokens), 2 blocks: fast enough to build many times."""
    return vit(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def fake_sparse(dense_model, sparse_model):
    """The dense model with each replaced layer's weight multiplied by the sparse layer's mask."""
    model = copy.deepcopy(dense_model)
    modules = dict(model.named_modules())
    for name, layer in sparse_model.named_modules():
        if isinstance(layer, SparseLinear):
            with torch.no_grad():
                modules[name].weight.mul_(layer.mask())
    return model


CONFIGS = [
    SparsityConfig("unstructured", 0.5),
    SparsityConfig("2:4"),
    SparsityConfig("block", 0.5, block_size=32),
    SparsityConfig("block", 0.75, block_size=(16, 32)),
]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.pattern}-{c.sparsity}-{c.block_size}")
def test_sparsify_timm_models_equals_fake_sparse(name, config):
    dense = vit(name)
    sparse = sparsify_(copy.deepcopy(dense), config)
    summary = sparsity_summary(sparse)
    depth = len(dense.blocks)
    assert len(summary) == 4 * depth
    assert {layer.name.split(".")[-1] for layer in summary.layers} == {"qkv", "proj", "fc1", "fc2"}
    assert all(layer.name.startswith("blocks.") for layer in summary.layers)
    assert isinstance(sparse.head, nn.Linear) and isinstance(sparse.patch_embed.proj, nn.Conv2d)
    # The masks are the magnitude masks of the original weights.
    original = dict(dense.named_modules())
    for layer_summary in summary.layers[:4]:
        layer = sparse.get_submodule(layer_summary.name)
        w = original[layer_summary.name].weight.detach()
        if config.pattern == "unstructured":
            expected = masks.magnitude_mask(w, config.sparsity)
        elif config.pattern == "2:4":
            expected = masks.nm_mask(w)
        else:
            expected = masks.block_mask(w, config.sparsity, config.block_size)
        assert torch.equal(layer.mask(), expected)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(sparse(x), fake_sparse(dense, sparse)(x))


FAMILIES = {  # timm name -> (create_model kwargs, input side): small inputs, the layers are the full model's
    "eva02_tiny_patch14_224": ({"img_size": 56}, 56),
    "swin_tiny_patch4_window7_224": ({"img_size": 112}, 112),
    "convnext_tiny": ({}, 64),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_sparsify_other_timm_families_equals_fake_sparse(name):
    # EVA reads qkv.weight itself (F.linear(x, self.qkv.weight, qkv_bias)); Swin is a windowed transformer;
    # ConvNeXt's MLP is a pair of nn.Linear layers in a convolutional network.
    kwargs, side = FAMILIES[name]
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    sparse = sparsify_(copy.deepcopy(dense), "2:4")
    assert len(sparsity_summary(sparse)) >= 2 * sum(1 for n, _ in dense.named_modules() if n.endswith(".mlp"))
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(sparse(x), fake_sparse(dense, sparse)(x))


def test_an_eva_model_that_reads_weight_itself_still_trains_the_kept_weights():
    torch.manual_seed(0)
    model = sparsify_(timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=10, img_size=28, patch_size=14), "2:4")
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, SparseLinear)
    model(torch.randn(2, 3, 28, 28)).square().mean().backward()
    assert qkv.values.grad is not None and bool(qkv.values.grad.abs().sum() > 0)


def test_weight_is_the_masked_dense_weight_a_differentiable_read_only_copy():
    linear = nn.Linear(64, 32)
    layer = SparseLinear.from_dense(linear, "unstructured", sparsity=0.5)
    weight = layer.weight
    assert torch.equal(weight, linear.weight * layer.mask()) and weight.shape == (layer.out_features, layer.in_features)
    with torch.no_grad():
        weight.zero_()  # a copy: the layer is unchanged
    assert torch.equal(layer.weight, linear.weight * layer.mask())
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(32, 64)
    layer.weight.sum().backward()
    assert torch.equal(layer.values.grad, torch.ones_like(layer.values))


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_sparsify_warns_when_no_layer_matches(name):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with pytest.warns(UserWarning, match=r"no layer of \w+ matched filter_fn='default_filter', so nothing was sparsified .*nn.Linear"):
        assert sparsify_(model, "2:4") is model
    assert len(sparsity_summary(model)) == 0


def test_sparsify_returns_the_model_and_accepts_a_pattern_string():
    model = small_vit()
    assert sparsify_(model, "2:4") is model
    assert all(layer.pattern == "2:4" for layer in sparsity_summary(model).layers)


def test_summary_reports_bytes_and_density():
    model = sparsify_(small_vit(), SparsityConfig("block", 0.5, block_size=16))
    summary = sparsity_summary(model)
    assert summary.density == pytest.approx(0.5, abs=0.02)
    assert summary.compact_bytes < 0.55 * summary.dense_bytes
    text = str(summary)
    assert "blocks.0.attn.qkv" in text and "8 sparse layers" in text


def test_densify_restores_nn_linear_with_masked_weights():
    dense = small_vit()
    sparse = sparsify_(copy.deepcopy(dense), "unstructured")
    expected = fake_sparse(dense, sparse)
    restored = densify_(sparse)
    assert len(sparsity_summary(restored)) == 0
    assert isinstance(restored.blocks[0].mlp.fc1, nn.Linear)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(restored(x), expected(x))


def test_filter_fn_and_given_masks():
    model = small_vit()
    only_mlp = sparsify_(copy.deepcopy(model), "2:4", filter_fn=lambda m, name: name.endswith(("fc1", "fc2")))
    assert [layer.name for layer in sparsity_summary(only_mlp).layers] == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    # Global magnitude masks over all prunable weights, then sparsify with them.
    weights = {n: m.weight.detach() for n, m in model.named_modules() if lk.nn.default_filter(m, n)}
    global_masks = masks.global_magnitude_masks(weights, 0.6)
    sparse = sparsify_(copy.deepcopy(model), SparsityConfig("unstructured"), masks=global_masks)
    for name, mask in global_masks.items():
        assert torch.equal(sparse.get_submodule(name).mask(), mask)
    assert sparsity_summary(sparse).density == pytest.approx(0.4, abs=1e-3)
    with pytest.raises(ValueError, match="not sparsified"):
        sparsify_(copy.deepcopy(model), "unstructured", masks={"blocks.0.norm1": torch.ones(64, dtype=torch.bool)})


def test_sparsified_model_state_dict_is_smaller_and_reloads_exactly():
    dense = small_vit()
    sparse = sparsify_(copy.deepcopy(dense), SparsityConfig("block", 0.7, block_size=16))
    buffers = {}
    for label, model in (("dense", dense), ("sparse", sparse)):
        buffers[label] = io.BytesIO()
        torch.save(model.state_dict(), buffers[label])
    assert buffers["sparse"].getbuffer().nbytes < buffers["dense"].getbuffer().nbytes
    # A fresh model of the same architecture, sparsified (any sparsity), takes the saved state.
    fresh = sparsify_(small_vit(), SparsityConfig("block", 0.1, block_size=16))
    buffers["sparse"].seek(0)
    fresh.load_state_dict(torch.load(buffers["sparse"], weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), sparse(x))


def test_training_step_on_a_sparsified_vit_keeps_pruned_weights_zero():
    model = sparsify_(small_vit().train(), "2:4")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    masks_before = {name: layer.mask() for name, layer in model.named_modules() if isinstance(layer, SparseLinear)}
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, mask in masks_before.items():
        weight = model.get_submodule(name).to_dense()
        assert torch.equal(model.get_submodule(name).mask(), mask)
        assert bool((weight[~mask] == 0).all())
    assert model.blocks[0].attn.qkv.values.grad is not None


def test_sparsify_errors_name_the_layer_and_the_argument():
    model = vit(img_size=32, patch_size=4, embed_dim=66, depth=1, num_heads=2, num_classes=10)  # 66 % 4 != 0
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.attn\.qkv'.*divisible by 4"):
        sparsify_(model, "2:4")
    with pytest.raises(TypeError, match="config must be"):
        sparsify_(small_vit(), 0.5)
    with pytest.raises(TypeError, match="model must be"):
        sparsify_("vit", "2:4")
    with pytest.raises(ValueError, match="pattern must be one of"):
        SparsityConfig("4:8")
    with pytest.raises(ValueError, match="sparsity 0.5"):
        SparsityConfig("2:4", sparsity=0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparsityConfig("unstructured", sparsity=1.5)


def test_compiled_sparsified_vit():
    model = sparsify_(small_vit(), "block")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(compiled(x), model(x))


def test_fuse_gelu_moves_the_mlp_activation_into_fc1_and_back():
    dense = small_vit()
    plain = sparsify_(copy.deepcopy(dense), SparsityConfig("block", 0.5, block_size=16))
    fused = sparsify_(copy.deepcopy(dense), SparsityConfig("block", 0.5, block_size=16, fuse_gelu=True))
    assert fused.blocks[0].mlp.fc1.activation == "gelu" and isinstance(fused.blocks[0].mlp.act, nn.Identity)
    assert fused.blocks[0].attn.qkv.activation == "none"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fused(x), plain(x))
    restored = densify_(fused)
    assert isinstance(restored.blocks[0].mlp.act, nn.GELU)
    assert torch.equal(restored(x), fake_sparse(dense, plain)(x))
    # The saved state records the activation: a layer without it refuses the state.
    state = sparsify_(copy.deepcopy(dense), SparsityConfig("2:4", fuse_gelu=True)).state_dict()
    with pytest.raises(RuntimeError, match="activation saved 'gelu' vs module 'none'"):
        sparsify_(small_vit(), "2:4").load_state_dict(state)


def test_sparsify_like_rebuilds_sparse_layers_from_a_saved_state():
    from lotus_kernels import sparsify_like_

    dense = small_vit()
    sparse = sparsify_(copy.deepcopy(dense), SparsityConfig("block", 0.5, block_size=16, fuse_gelu=True))
    sparse.blocks[1].attn.qkv = SparseLinear.from_dense(dense.blocks[1].attn.qkv, "2:4")  # mixed patterns
    state = sparse.state_dict()
    fresh = sparsify_like_(small_vit(), state)
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), sparse(x))
    assert fresh.blocks[1].attn.qkv.pattern == "2:4" and isinstance(fresh.blocks[0].mlp.act, nn.Identity)
    with pytest.raises(ValueError, match="has Conv2d there"):
        sparsify_like_(small_vit(), {"patch_embed.proj._extra_state": {"pattern": "2:4"}})
