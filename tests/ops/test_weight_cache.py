"""Derived copies of stored weights (lotus_kernels.ops.weight_cache) and the dense backend's use of them, eager and compiled."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from lotus_kernels import SparseLinear
from lotus_kernels.ops import weight_cache

PATTERNS = ["2:4", "block", "unstructured"]


@pytest.fixture
def cache(monkeypatch):
    torch._dynamo.reset()  # other tests compile SparseLinear too: stay under dynamo's recompile limit
    monkeypatch.setattr(weight_cache, "_CACHE", {})
    builds = []
    original = weight_cache.dense_weight_ref

    def counting(*args):
        builds.append(args[0])
        return original(*args)

    monkeypatch.setattr(weight_cache, "dense_weight_ref", counting)
    return builds


def layer(pattern, seed=0, **kwargs):
    torch.manual_seed(seed)
    sparsity = None if pattern == "2:4" else 0.5
    return SparseLinear.from_dense(torch.nn.Linear(64, 32), pattern, sparsity=sparsity, block_size=16, **kwargs)


def test_derived_is_built_once_per_state_and_per_name():
    values, index = torch.randn(4, 8), torch.zeros(4, dtype=torch.int32)
    builds = []

    def build():
        builds.append(1)
        return values * 2

    a = weight_cache.derived("x", values, (index,), build)
    assert weight_cache.derived("x", values, (index,), build) is a and len(builds) == 1
    weight_cache.derived("y", values, (index,), build)  # another copy of the same weight
    assert len(builds) == 2
    index.add_(1)  # an index buffer changed in place
    weight_cache.derived("x", values, (index,), build)
    assert len(builds) == 3
    with torch.no_grad():
        values.mul_(3)
    torch.testing.assert_close(weight_cache.derived("x", values, (index,), build), values * 2)
    assert len(builds) == 4


def test_a_copy_goes_with_its_tensor_and_is_never_served_to_another(monkeypatch):
    monkeypatch.setattr(weight_cache, "_CACHE", {})
    values = torch.randn(4, 8)
    weight_cache.derived("x", values, (), values.clone)
    assert weight_cache.cached_nbytes() == 4 * 8 * 4
    del values
    gc.collect()
    assert weight_cache._CACHE == {} and weight_cache.cached_nbytes() == 0
    # A new tensor that lands on a freed one's id and address, with version 0, must not
    # be served the old copy: forge exactly that entry and look it up.
    old, new = torch.zeros(3), torch.ones(3)
    state = weight_cache._state(new, ())
    weight_cache._CACHE[(id(new), "x")] = (lambda: old, state, old)
    assert torch.equal(weight_cache.derived("x", new, (), lambda: new.clone()), new)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_dense_inference_builds_once_and_follows_updates(cache, pattern, compiler):
    ours = layer(pattern, backend="dense")
    compiled = torch.compile(ours, backend=compiler, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(7, 64)
            torch.testing.assert_close(compiled(x), F.linear(x, ours.to_dense(), ours.bias))
        # Before: the graph rebuilt the dense weight on every call.
        assert cache == [pattern]
        ours.values.mul_(-2)
        torch.testing.assert_close(compiled(x), F.linear(x, ours.to_dense(), ours.bias))
    assert len(cache) == 2


def test_compiled_dense_training_still_reaches_the_values(cache):
    ours, ref = layer("block", backend="dense"), layer("block", backend="reference")
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 64)
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(ours.values.grad, ref.values.grad)
    assert cache == []  # training does not read (or fill) the inference cache


def test_compiled_frozen_weights_give_input_and_bias_gradients(cache):
    ours = layer("2:4", backend="dense").requires_grad_(False)
    ours.bias.requires_grad_(True)  # bias-only tuning
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 64, requires_grad=True)
    compiled(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = ours.bias.detach().clone().requires_grad_()
    F.linear(x_ref, ours.to_dense(), bias_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.bias.grad, bias_ref.grad)
    assert ours.values.grad is None


def test_the_dense_op_passes_opcheck_and_is_kept_out_of_cuda_graphs():
    ours = layer("unstructured")
    values = ours.values.detach()  # frozen weights: the op's domain
    x = torch.randn(3, 5, 64, requires_grad=True)
    args = (x, values, list(ours.index_tensors()), ours.bias, "unstructured", 32, 64)
    torch.library.opcheck(torch.ops.lotus_kernels.dense_linear_cached.default, args)
    if weight_cache.CUDAGRAPH_UNSAFE:  # torch >= the tag and custom_op(tags=...)
        assert torch.Tag.cudagraph_unsafe in torch.ops.lotus_kernels.dense_linear_cached.default.tags


def test_autocast_caches_the_weight_in_the_compute_dtype(cache):
    ours = layer("2:4", backend="dense")
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ys = [ours(x) for _ in range(3)]
    assert ys[0].dtype == torch.bfloat16 and len(cache) == 1
    torch.testing.assert_close(ys[-1].float(), F.linear(x, ours.to_dense(), ours.bias), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        ours(x)  # fp32 outside autocast: a second copy, the bf16 one stays valid
        assert len(cache) == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours(x)
    assert len(cache) == 2


def test_copies_of_a_layer_do_not_share_its_cache(cache):
    ours = layer("block", backend="dense")
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = ours(x)
        twin = copy.deepcopy(ours)
        ours.values.zero_()
        torch.testing.assert_close(twin(x), before)
        torch.testing.assert_close(ours(x), ours.bias.expand(4, -1))


def test_layers_built_in_inference_mode_run_and_are_never_served_a_stale_copy(cache):
    # Inference tensors have no version counter: the copy is rebuilt rather than trusted.
    with torch.inference_mode():
        ours = layer("2:4", backend="dense")
        x = torch.randn(3, 64)
        first = ours(x)
        ours.values.mul_(2)
        torch.testing.assert_close(ours(x), F.linear(x, ours.to_dense(), ours.bias))
        assert not torch.equal(ours(x), first)
    assert weight_cache._CACHE == {}


def test_a_copy_first_made_in_inference_mode_serves_input_gradients_later(cache):
    ours = layer("block", backend="dense").requires_grad_(False)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        ours(x)
    x = x.clone().requires_grad_()
    ours(x).sum().backward()
    torch.testing.assert_close(x.grad, ours.to_dense().sum(0).expand(3, -1))
    assert len(cache) == 1


def test_a_compiled_sparsified_vit_builds_each_layers_copy_once(cache):
    import timm
    from lotus_kernels import SparsityConfig, sparsify_

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10
    ).eval()
    dense_model = copy.deepcopy(model)
    sparsify_(model, SparsityConfig("unstructured", sparsity=0.5, backend="dense"))
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = [compiled(x) for _ in range(3)]
        expected = model(x)
    assert len(cache) == len(layers) > 0  # one dense copy per layer, not one per layer per call
    torch.testing.assert_close(outputs[-1], expected)
    assert not torch.allclose(expected, dense_model(x))  # half the weights really are gone
