"""SparseLinear: masked-dense semantics, training, state_dict, backends, bad input."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import devices

from lotus_kernels import SparseLinear, backends, masks

PATTERNS = [("unstructured", 0.6, 32), ("2:4", None, 32), ("block", 0.5, 16), ("block", 0.7, (16, 32))]


def make_linear(in_features=96, out_features=64, bias=True, dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)


def expected_mask(linear, pattern, sparsity, block_size):
    w = linear.weight.detach()
    if pattern == "unstructured":
        return masks.magnitude_mask(w, sparsity)
    if pattern == "2:4":
        return masks.nm_mask(w)
    return masks.block_mask(w, sparsity, block_size)


def fake_sparse(linear, mask):
    """The dense model the sparse one must equal: an nn.Linear holding weight * mask."""
    dense = copy.deepcopy(linear)
    with torch.no_grad():
        dense.weight.mul_(mask)
    return dense


@pytest.mark.parametrize("pattern,sparsity,block_size", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(96,), (7, 96), (3, 65, 96), (1, 197, 96)])
def test_forward_equals_fake_sparse_dense(pattern, sparsity, block_size, dtype, x_shape):
    linear = make_linear(dtype=dtype)
    sparse = SparseLinear.from_dense(linear, pattern, sparsity=sparsity, block_size=block_size)
    mask = expected_mask(linear, pattern, sparsity, block_size)
    assert torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.to_dense(), linear.weight.detach() * mask)
    x = torch.randn(x_shape, dtype=dtype)
    y = sparse(x)
    assert y.shape == (*x_shape[:-1], 64) and y.dtype == dtype
    assert torch.equal(y, fake_sparse(linear, mask)(x))


def test_non_contiguous_input_and_no_bias():
    linear = make_linear(bias=False)
    sparse = SparseLinear.from_dense(linear, "block", sparsity=0.5, block_size=32)
    x = torch.randn(96, 5, 3).permute(2, 1, 0)  # [3, 5, 96], non-contiguous
    assert not x.is_contiguous()
    assert sparse.bias is None
    assert torch.equal(sparse(x), F.linear(x, sparse.to_dense()))


def test_block_edge_cases_empty_and_full_block_rows():
    linear = make_linear(in_features=64, out_features=64)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:32] = True  # a fully dense block row; rows 0..15, 32..63 fully pruned
    mask[48:64, :16] = True  # first block of the last block row
    sparse = SparseLinear.from_dense(linear, "block", mask=mask, block_size=16)
    assert sparse.crow_indices.tolist() == [0, 0, 4, 4, 5]
    x = torch.randn(7, 64)
    y = sparse(x)
    assert torch.equal(y, fake_sparse(linear, mask)(x))
    assert torch.equal(y[:, :16], linear.bias.detach()[:16].expand(7, 16))  # empty block row: bias only


@pytest.mark.parametrize("pattern,sparsity,block_size", PATTERNS)
def test_given_mask_is_used_verbatim(pattern, sparsity, block_size):
    linear = make_linear()
    score = torch.rand(64, 96, generator=torch.Generator().manual_seed(9))
    mask = masks.project_mask(score, pattern, sparsity, block_size)
    sparse = SparseLinear.from_dense(linear, pattern, mask=mask, block_size=block_size)
    assert torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.to_dense(), linear.weight.detach() * mask)


def test_kept_weights_that_are_exactly_zero_stay_kept():
    linear = make_linear(in_features=16, out_features=4)
    with torch.no_grad():
        linear.weight[:, 1] = 0.0
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool).repeat(4, 4)
    for pattern in ("2:4", "unstructured"):
        sparse = SparseLinear.from_dense(linear, pattern, mask=mask)
        assert torch.equal(sparse.mask(), mask), pattern


@pytest.mark.parametrize("pattern,sparsity,block_size", PATTERNS)
def test_density_repr_and_sizes(pattern, sparsity, block_size):
    sparse = SparseLinear.from_dense(make_linear(), pattern, sparsity=sparsity, block_size=block_size)
    if sparsity is None:
        expected_density = 0.5
    elif pattern == "block":
        blocks = (64 // sparse.block_size[0]) * (96 // sparse.block_size[1])
        expected_density = (blocks - masks.num_pruned(blocks, sparsity)) / blocks
    else:
        expected_density = (64 * 96 - masks.num_pruned(64 * 96, sparsity)) / (64 * 96)
    assert sparse.density == expected_density
    text = repr(sparse)
    assert f"pattern='{pattern}'" in text and f"density={expected_density:.3f}" in text
    assert sparse.dense_nbytes() == 64 * 96 * 4
    assert sparse.compact_nbytes() < sparse.dense_nbytes()


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("pattern,sparsity,block_size", PATTERNS)
@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd_momentum_wd", "adamw"],
)
def test_training_updates_only_kept_weights_like_masked_dense(pattern, sparsity, block_size, make_optimizer):
    linear = make_linear()
    sparse = SparseLinear.from_dense(linear, pattern, sparsity=sparsity, block_size=block_size)
    mask = sparse.mask()
    dense = fake_sparse(linear, mask)
    opt_sparse, opt_dense = make_optimizer(sparse.parameters()), make_optimizer(dense.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, target = torch.randn(5, 96, generator=g), torch.randn(5, 64, generator=g)
        for model, opt in ((sparse, opt_sparse), (dense, opt_dense)):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            if model is dense:  # what a masked-dense trainer does by hand
                dense.weight.grad.mul_(mask)
            opt.step()
            if model is dense:
                with torch.no_grad():
                    dense.weight.mul_(mask)
    assert sparse.bias.grad is not None and sparse.values.grad is not None
    weight = sparse.to_dense().detach()
    assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))  # pruned stay exactly zero
    assert torch.allclose(weight, dense.weight.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(sparse.bias.detach(), dense.bias.detach(), rtol=1e-5, atol=1e-6)


def test_gradient_of_values_is_the_masked_dense_gradient():
    linear = make_linear()
    sparse = SparseLinear.from_dense(linear, "unstructured", sparsity=0.5)
    mask = sparse.mask()
    dense = fake_sparse(linear, mask)
    x = torch.randn(4, 96)
    sparse(x).square().sum().backward()
    dense(x).square().sum().backward()
    assert torch.equal(sparse.values.grad, dense.weight.grad[mask])
    assert torch.equal(sparse.bias.grad, dense.bias.grad)


# ---------------------------------------------------------------------- state_dict


def state_bytes(module):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@pytest.mark.parametrize("pattern,sparsity,block_size", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_dict_is_compact_and_reloads_bit_for_bit(pattern, sparsity, block_size, dtype):
    linear = make_linear(in_features=256, out_features=256, dtype=dtype)
    sparse = SparseLinear.from_dense(linear, pattern, sparsity=sparsity, block_size=block_size)
    assert state_bytes(sparse) < 0.6 * state_bytes(linear)
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    fresh = SparseLinear(256, 256, pattern=pattern, block_size=block_size, dtype=dtype)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(9, 256, dtype=dtype)
    assert torch.equal(fresh(x), sparse(x))
    assert torch.equal(fresh.mask(), sparse.mask())
    assert isinstance(fresh.values, nn.Parameter) and fresh.values.requires_grad


def test_state_dict_keys_hold_the_compact_form():
    keys = {
        "unstructured": {"values", "packed_mask", "bias", "_extra_state"},
        "2:4": {"values", "metadata", "bias", "_extra_state"},
        "block": {"values", "crow_indices", "col_indices", "bias", "_extra_state"},
    }
    for pattern, expected in keys.items():
        sparse = SparseLinear.from_dense(make_linear(), pattern, sparsity=None if pattern == "2:4" else 0.5, block_size=32)
        assert set(sparse.state_dict()) == expected


def test_load_state_dict_rejects_other_layouts_and_corruption():
    sparse = SparseLinear.from_dense(make_linear(), "block", sparsity=0.5, block_size=16)
    state = sparse.state_dict()
    with pytest.raises(RuntimeError, match=r"block_size saved \(16, 16\) vs module \(32, 32\)"):
        SparseLinear(96, 64, pattern="block", block_size=32).load_state_dict(state)
    with pytest.raises(RuntimeError):  # different pattern: different keys
        SparseLinear(96, 64, pattern="unstructured").load_state_dict(state)
    broken = dict(state)
    broken["col_indices"] = broken["col_indices"] + 100
    with pytest.raises(RuntimeError, match="inconsistent"):
        SparseLinear(96, 64, pattern="block", block_size=16).load_state_dict(broken)
    unstructured = SparseLinear.from_dense(make_linear(), "unstructured", sparsity=0.5).state_dict()
    unstructured["values"] = unstructured["values"][:-1]
    with pytest.raises(RuntimeError, match="saved mask keeps"):
        SparseLinear(96, 64, pattern="unstructured").load_state_dict(unstructured)
    two_four = SparseLinear.from_dense(make_linear(), "2:4").state_dict()
    with pytest.raises(RuntimeError, match="saved values have shape"):
        SparseLinear(96, 64, pattern="2:4").load_state_dict({**two_four, "values": two_four["values"][:, :-2]})
    two_four["metadata"][3, 1] = 0  # codes slots (0, 0)
    with pytest.raises(RuntimeError, match="row 3 group 8"):
        SparseLinear(96, 64, pattern="2:4").load_state_dict(two_four)


def test_module_conversions_deepcopy_and_dtype():
    sparse = SparseLinear.from_dense(make_linear(), "2:4")
    clone = copy.deepcopy(sparse)
    x = torch.randn(3, 96)
    assert torch.equal(clone(x), sparse(x))
    half = copy.deepcopy(sparse).to(torch.float64)
    assert half.values.dtype == torch.float64 and half.metadata.dtype == torch.int32
    assert torch.equal(half(x.double()), F.linear(x.double(), sparse.to_dense().double(), sparse.bias.double()))


def test_autocast_bfloat16():
    sparse = SparseLinear.from_dense(make_linear(), "block", sparsity=0.5, block_size=32)
    x = torch.randn(4, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), sparse(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("pattern,sparsity,block_size", PATTERNS[:3])
def test_torch_compile_fullgraph(pattern, sparsity, block_size):
    sparse = SparseLinear.from_dense(make_linear(), pattern, sparsity=sparsity, block_size=block_size)
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 96)
    assert torch.equal(compiled(x), sparse(x))


@pytest.mark.parametrize("device", devices())
def test_on_each_device(device):
    linear = make_linear(device=device)
    sparse = SparseLinear.from_dense(linear, "block", sparsity=0.5, block_size=32)
    x = torch.randn(5, 96, device=device)
    assert torch.equal(sparse(x), fake_sparse(linear, sparse.mask())(x))


@pytest.mark.cuda
def test_cuda_matches_cpu_for_every_pattern():
    for pattern, sparsity, block_size in PATTERNS:
        cpu = SparseLinear.from_dense(make_linear(), pattern, sparsity=sparsity, block_size=block_size)
        gpu = SparseLinear.from_dense(make_linear(device="cuda"), pattern, sparsity=sparsity, block_size=block_size)
        for name, tensor in cpu.state_dict().items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(gpu.state_dict()[name].cpu(), tensor), (pattern, name)


# ---------------------------------------------------------------------- backends


def test_backend_reference_and_auto():
    sparse = SparseLinear.from_dense(make_linear(), "2:4", backend="reference")
    assert sparse.backend == "reference"
    # auto on CPU: the cached dense matmul; the reference is for explicit use only.
    assert backends.select("auto", backends.LayerSpec("2:4", torch.device("cpu"), torch.float32)).name == "dense"
    assert "reference" not in [b.name for b in backends.auto_candidates(backends.LayerSpec("2:4", torch.device("cpu"), torch.float32))]
    assert ("reference", None) in backends.explain(backends.LayerSpec("block", torch.device("cpu"), torch.float16, (32, 32)))
    assert backends.backend_names()[-2:] == ["dense", "reference"]


@pytest.mark.parametrize("pattern", ["2:4", "block", "unstructured"])
def test_dense_backend_caches_the_weight_until_it_changes(pattern, monkeypatch):
    from lotus_kernels.ops import weight_cache

    layer = SparseLinear.from_dense(make_linear(), pattern, sparsity=None if pattern == "2:4" else 0.5, block_size=16, backend="dense")
    x = torch.randn(5, 96)
    builds = []
    original = weight_cache.dense_weight_ref

    def counting_dense_weight_ref(*args):
        builds.append(1)
        return original(*args)

    monkeypatch.setattr(weight_cache, "dense_weight_ref", counting_dense_weight_ref)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(builds) == 1  # cached
    expected = F.linear(x, layer.to_dense(), layer.bias)
    assert torch.allclose(first, expected, atol=1e-6)
    # Training: rebuilt differentiably (not from the cache), gradients reach only the stored values.
    layer(x).sum().backward()
    assert layer.values.grad is not None and len(builds) == 1
    torch.optim.SGD(layer.parameters(), lr=0.5).step()  # bumps values' version
    with torch.no_grad():
        after = layer(x)
    assert len(builds) == 2 and not torch.equal(after, first)
    assert torch.allclose(after, F.linear(x, layer.to_dense(), layer.bias), atol=1e-6)
    # load_state_dict copies in place: the cache must not survive it.
    fresh = SparseLinear.from_dense(
        make_linear(), pattern, sparsity=None if pattern == "2:4" else 0.5, block_size=16, backend="reference"
    )
    layer.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert torch.allclose(layer(x), fresh(x), atol=1e-6)
    assert len(builds) == 3


def test_a_registered_backend_takes_over_auto_and_the_contract_holds(monkeypatch):
    monkeypatch.setattr(backends.LINEAR, "_backends", {name: backends.LINEAR._backends[name] for name in ("dense", "reference")})
    calls = []

    def forward(module, x):
        calls.append(module.pattern)
        return F.linear(x, module.to_dense(), module.bias)

    backends.register_backend(
        backends.Backend("toy", "test backend", lambda spec: None if spec.pattern == "block" else "block only", forward)
    )
    assert backends.backend_names() == ["toy", "dense", "reference"]
    block = SparseLinear.from_dense(make_linear(), "block", sparsity=0.5, block_size=32)
    block(torch.randn(2, 96))
    unstructured = SparseLinear.from_dense(make_linear(), "unstructured", sparsity=0.5)
    unstructured(torch.randn(2, 96))  # toy declines: auto falls back to dense
    assert calls == ["block"]
    unstructured.backend = "toy"
    with pytest.raises(RuntimeError, match="block only"):
        unstructured(torch.randn(2, 96))


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,exc,text",
    [
        (lambda l: SparseLinear.from_dense(l, "3:4"), ValueError, "pattern must be one of"),
        (lambda l: SparseLinear.from_dense(l, "unstructured", sparsity=1.0), ValueError, "[0, 1)"),
        (lambda l: SparseLinear.from_dense(l, "unstructured", sparsity=-0.2), ValueError, "[0, 1)"),
        (lambda l: SparseLinear.from_dense(l, "unstructured"), ValueError, "exactly one of sparsity or mask"),
        (lambda l: SparseLinear.from_dense(l, "block", sparsity=0.5, mask=torch.ones(64, 96, dtype=torch.bool)), ValueError, "exactly one"),
        (lambda l: SparseLinear.from_dense(l, "2:4", sparsity=0.7), ValueError, "sparsity 0.5"),
        (lambda l: SparseLinear.from_dense(make_linear(in_features=30), "2:4"), ValueError, "divisible by 4"),
        (lambda l: SparseLinear.from_dense(l, "block", sparsity=0.5, block_size=64), ValueError, "divisible by block_size"),
        (lambda l: SparseLinear.from_dense(l, "block", sparsity=0.5, block_size=(16, 0)), ValueError, "positive"),
        (lambda l: SparseLinear.from_dense(l, "unstructured", mask=torch.ones(96, 64, dtype=torch.bool)), ValueError, "mask must have shape"),
        (lambda l: SparseLinear.from_dense(l, "unstructured", mask=torch.ones(64, 96)), TypeError, "bool"),
        (lambda l: SparseLinear.from_dense(l, "2:4", mask=torch.ones(64, 96, dtype=torch.bool)), ValueError, "exactly 2 of every 4"),
        (lambda l: SparseLinear.from_dense(l, "block", block_size=32, mask=torch.eye(64, 96, dtype=torch.bool)), ValueError, "not block-structured"),
        (lambda l: SparseLinear.from_dense(nn.Conv2d(3, 3, 1), "2:4"), TypeError, "nn.Linear"),
        (lambda l: SparseLinear.from_dense(l, "2:4", backend="cutlass"), ValueError, "backend must be one of"),
        (lambda l: SparseLinear(0, 4), ValueError, "in_features must be positive"),
        (lambda l: SparseLinear(4.0, 4), TypeError, "in_features must be an int"),
        (lambda l: SparseLinear(8, 4, dtype=torch.int32), TypeError, "dtype"),
        (lambda l: SparseLinear.from_dense(make_linear(dtype=torch.float16), "2:4")(torch.randn(2, 96)), TypeError, "dtype"),
        (lambda l: SparseLinear.from_dense(l, "2:4")(torch.randn(2, 95)), ValueError, "in_features=96"),
        (lambda l: SparseLinear.from_dense(l, "2:4")(torch.tensor(1.0)), ValueError, "in_features=96"),
        (lambda l: SparseLinear.from_dense(l, "2:4")([1.0] * 96), TypeError, "torch.Tensor"),
        (lambda l: SparseLinear.from_dense(l, "2:4")(torch.randn(2, 96, device="meta")), ValueError, "meta"),
    ],
)
def test_bad_input_raises_clear_errors(call, exc, text):
    with pytest.raises(exc) as info:
        call(make_linear())
    assert text in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected(bad):
    linear = make_linear()
    with torch.no_grad():
        linear.weight[3, 4] = bad
    for pattern in ("2:4", "block", "unstructured"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            SparseLinear.from_dense(linear, pattern, sparsity=None if pattern == "2:4" else 0.5)


# ---------------------------------------------------------------------- hostile state_dicts (issue #16)


def _corruptions(pattern: str):
    """(name, state -> corrupted state, text the error must contain) for a saved layer of this pattern."""
    index = {"block": ("crow_indices", "col_indices"), "2:4": ("metadata",), "unstructured": ("packed_mask",)}[pattern]
    cases = [(f"no {name}", lambda s, n=name: {k: v for k, v in s.items() if k != n}, f"not ['{name}']") for name in index]
    cases += [
        ("no values", lambda s: {k: v for k, v in s.items() if k != "values"}, "not ['values']"),
        ("int64 values", lambda s: {**s, "values": s["values"].long()}, "values must be a floating-point tensor"),
        ("values on meta", lambda s: {**s, "values": s["values"].to("meta")}, "dense tensor with data"),
        ("values as a list", lambda s: {**s, "values": s["values"].tolist()}, "not a tensor"),
        ("bias of another shape", lambda s: {**s, "bias": s["bias"][:-1]}, "saved bias has shape"),
        (f"float {index[-1]}", lambda s, n=index[-1]: {**s, n: s[n].float()}, f"{index[-1]} must be torch."),
    ]
    if pattern == "block":

        def bump(s, at):
            crow = s["crow_indices"].clone()
            crow[at] += 1
            return {**s, "crow_indices": crow}

        def duplicate(s):
            col = s["col_indices"].clone()
            col[1] = col[0]  # block row 0 keeps at least two blocks here
            return {**s, "col_indices": col}

        cases += [
            ("crow[-1] + 1", lambda s: bump(s, -1), "valid BSR row pointer"),
            ("crow[1] + 1", lambda s: bump(s, 1), "inconsistent"),  # moves a block into row 0 twice
            ("col = -3", lambda s: {**s, "col_indices": torch.full_like(s["col_indices"], -3)}, "must lie in [0, 6)"),
            ("col = 10**8", lambda s: {**s, "col_indices": torch.full_like(s["col_indices"], 10**8)}, "must lie in [0, 6)"),
            ("duplicate column", duplicate, "twice in block row 0"),
            ("values of another block", lambda s: {**s, "values": s["values"][:, :, :8]}, "inconsistent"),
        ]
    return cases


@pytest.mark.parametrize("pattern", ["block", "2:4", "unstructured"])
@pytest.mark.parametrize("strict", [True, False])
def test_a_failed_load_changes_nothing_and_names_the_problem(pattern, strict):
    # Before: values/col_indices were resized and copied before the structure check raised,
    # and the next triton forward read out of bounds; a missing key said "allocated size does
    # not match required size"; float col_indices were truncated, int64 values too; with
    # strict=False a layout without metadata/packed_mask loaded and computed wrong outputs.
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[1, 1] = keep[3, 0] = False
    source = SparseLinear.from_dense(make_linear(seed=1), pattern, mask=masks.expand_block_mask(keep, 16) if pattern == "block" else None,
                                     sparsity=0.5 if pattern == "unstructured" else None, block_size=16)
    saved = source.state_dict()
    target = SparseLinear.from_dense(make_linear(seed=2), pattern, sparsity=None if pattern == "2:4" else 0.3, block_size=16,
                                     backend="triton" if pattern != "unstructured" else "auto")
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.randn(3, 96)
    y_before = target(x)
    for name, corrupt, text in _corruptions(pattern):
        with pytest.raises(RuntimeError) as info:
            target.load_state_dict(corrupt(dict(saved)), strict=strict)
        assert text in str(info.value), (name, str(info.value))
        after = target.state_dict()
        for key, tensor in before.items():
            assert after[key].shape == tensor.shape and torch.equal(after[key], tensor), (name, key)
        assert torch.equal(target(x), y_before), name
    target.load_state_dict(saved, strict=strict)  # and the clean state still loads
    torch.testing.assert_close(target(x), F.linear(x, source.to_dense(), source.bias))


def test_a_state_without_the_layer_loads_the_rest_under_strict_false():
    # strict=False is for partial states: a layer absent from the state stays as it was.
    layer = SparseLinear.from_dense(make_linear(), "2:4")
    before = layer.values.clone()
    result = layer.load_state_dict({"bias": torch.zeros(64)}, strict=False)
    assert set(result.missing_keys) == {"values", "metadata", "_extra_state"}
    assert torch.equal(layer.values, before) and torch.equal(layer.bias, torch.zeros(64))


def test_masks_whose_bytes_are_not_0_1_build_the_same_layer():
    linear = make_linear()
    clean = masks.magnitude_mask(linear.weight.detach(), 0.5)
    weird = (clean.to(torch.uint8) * 5).view(torch.bool)  # bytes 0 / 5
    for pattern, mask in (("unstructured", (clean, weird)), ("2:4", (masks.nm_mask(linear.weight.detach()),) * 2)):
        mask_clean, mask_weird = mask
        if pattern == "2:4":
            mask_weird = (mask_clean.to(torch.uint8) * 3).view(torch.bool)
        a = SparseLinear.from_dense(linear, pattern, mask=mask_clean)
        b = SparseLinear.from_dense(linear, pattern, mask=mask_weird)
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict() if k != "_extra_state")
