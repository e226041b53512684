"""The cuSPARSELt 2:4 backend.

On a CPU the three library calls (compress, sparse mm, algorithm search) are
stood in for by exact torch equivalents, so everything around them (the
transpose trick, row padding, bias, GELU, caching of the packed weight and
the algorithm, autograd, the custom op's registrations) is checked here;
the `cuda` tests run the real library.
"""

import pytest
import torch
import torch.nn.functional as F

import lotus_kernels

from lotus_kernels import SparseLinear, backends
from lotus_kernels.backends import cusparselt as cusparselt_backend
from lotus_kernels.ops import cusparselt, weight_cache
from lotus_kernels.backends import LayerSpec


class FakeLibrary:
    """Stands in for torch._cslt_*: "packed" is the dense 2:4 weight itself."""

    def __init__(self):
        self.compressed, self.searched, self.mm_rows, self.calls = 0, 0, [], []

    def compress(self, dense):
        groups = dense.reshape(dense.shape[0], -1, 4)
        assert int((groups != 0).sum(-1).max()) <= 2, "the library only takes 2:4 weights"
        self.compressed += 1
        return dense.clone()

    def sparse_mm(self, packed, dense_t, bias, alg_id, transpose_result):
        assert dense_t.shape[0] == packed.shape[1] and dense_t.shape[1] % cusparselt.ROW_MULTIPLE == 0
        self.mm_rows.append(dense_t.shape[1])
        self.calls.append({"alg_id": alg_id, "transpose_result": transpose_result, "dense_is_view_of_row_major": dense_t.t().is_contiguous()})
        y = packed @ dense_t  # [N, M]; the library adds bias per output row
        y = y + bias[:, None] if bias is not None else y
        return y.t().contiguous() if transpose_result else y.contiguous()

    def search(self, packed, dense_t, bias, transpose_result):
        self.searched += 1
        return 3


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibrary()
    monkeypatch.setattr(cusparselt, "_compress", lib.compress)
    monkeypatch.setattr(cusparselt, "_sparse_mm", lib.sparse_mm)
    monkeypatch.setattr(cusparselt, "_search", lib.search)
    monkeypatch.setattr(cusparselt, "_ALG_IDS", {})
    monkeypatch.setattr(cusparselt, "_CONFIG", cusparselt.CONFIGS["torch"])
    monkeypatch.setattr(weight_cache, "_CACHE", {})
    torch._dynamo.reset()  # other tests compile SparseLinear too: stay under dynamo's recompile limit
    return lib


@pytest.fixture
def searched(fake, monkeypatch):
    """The fake library under the configuration that searches the algorithm (transpose_result=True)."""
    monkeypatch.setattr(cusparselt, "_CONFIG", cusparselt.CONFIGS["searched"])
    return fake


def layer_pair(k, n, bias=True, activation="none", seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    ours = SparseLinear.from_dense(linear, "2:4", backend="reference", activation=activation)
    ref = SparseLinear.from_dense(linear, "2:4", backend="reference", activation=activation)
    return ours, ref


@pytest.mark.parametrize("config", list(cusparselt.CONFIGS))
@pytest.mark.parametrize("m", [1, 3, 65])
@pytest.mark.parametrize("k,n", [(64, 32), (192, 96)])
@pytest.mark.parametrize("bias,activation", [(True, "none"), (False, "none"), (True, "gelu")])
def test_forward_and_backward_match_the_reference(fake, monkeypatch, config, m, k, n, bias, activation):
    monkeypatch.setattr(cusparselt, "_CONFIG", cusparselt.CONFIGS[config])
    ours, ref = layer_pair(k, n, bias, activation)
    x = torch.randn(m, k, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = cusparselt_backend.cusparselt_linear(ours, x)
    y_ref = ref(x_ref)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.values.grad, ref.values.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    # Rows padded up to the dense operand's minimum multiple, then sliced off; y handed back contiguous.
    assert fake.mm_rows == [m + (-m % 8)] and y.is_contiguous()


def test_the_default_calls_the_library_as_torchs_semi_structured_path_does(fake):
    # What an H200 run proved in fp16 and bf16: transpose_result=False, the default algorithm (no search), and the
    # dense operand a transposed view of the row-major (padded) x.
    assert cusparselt.call_config().name == "torch" and cusparselt.PROVEN == ("torch",)
    ours, ref = layer_pair(64, 32)
    for m in (5, 8, 13):
        x = torch.randn(m, 64)
        torch.testing.assert_close(cusparselt_backend.cusparselt_linear(ours, x), ref(x), rtol=1e-5, atol=1e-5)
    assert fake.searched == 0
    assert fake.calls == [{"alg_id": 0, "transpose_result": False, "dense_is_view_of_row_major": True}] * 3


def test_auto_races_cusparselt_only_in_a_proven_configuration(monkeypatch):
    (backend,) = [b for b in backends.LINEAR._backends.values() if b.name == "cusparselt"]
    spec = LayerSpec("2:4", torch.device("cuda"), torch.float16, None, (64, 64))
    for name, proven in (("torch", True), ("transposed", False), ("searched", False)):
        monkeypatch.setattr(cusparselt, "_CONFIG", cusparselt.CONFIGS[name])
        assert backend.auto(spec) is proven, name
    monkeypatch.setattr(cusparselt, "_CONFIG", None)
    monkeypatch.setattr(cusparselt, "_CONFIG_ERROR", None)
    assert not backend.auto(spec) and backend.why_not(spec) == "turned off (LOTUS_CUSPARSELT=off)"


def test_set_call_config_checks_the_name(monkeypatch):
    monkeypatch.setattr(cusparselt, "_CONFIG", cusparselt._CONFIG)
    with pytest.raises(ValueError, match="must be one of .*'torch', 'transposed', 'searched', 'off'.*got 'fast'"):
        cusparselt.set_call_config("fast")
    cusparselt.set_call_config("off")
    assert cusparselt.call_config() is None
    cusparselt.set_call_config("transposed")
    assert cusparselt.call_config().transpose_result and not cusparselt.call_config().search


@pytest.mark.parametrize("value,expected", [("searched", "searched"), ("off", "off"), ("bogus", "bogus")])
def test_the_configuration_comes_from_the_environment_and_a_bad_one_never_breaks_import(value, expected):
    import subprocess
    import sys

    script = (
        "import torch; from lotus_kernels import SparseLinear; from lotus_kernels.ops import cusparselt; from lotus_kernels.backends import LayerSpec, cusparselt as cusparselt_backend\n"
        "c = cusparselt.call_config(); print(c.name if c else 'off')\n"
        "print(cusparselt_backend.why_not(LayerSpec('2:4', torch.device('cuda'), torch.float16, None, (64, 64))) if c is None else '')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**__import__("os").environ, "LOTUS_CUSPARSELT": value})
    assert done.returncode == 0, done.stderr[-2000:]
    name, reason = (done.stdout.splitlines() + [""])[:2]
    if expected == "bogus":
        assert name == "off" and "LOTUS_CUSPARSELT must be one of" in reason and "got 'bogus'" in reason
    elif expected == "off":
        assert name == "off" and reason == "turned off (LOTUS_CUSPARSELT=off)"
    else:
        assert name == "searched"


def test_leading_dims_and_noncontiguous_input(fake):
    ours, ref = layer_pair(64, 48)
    x = torch.randn(2, 64, 5).transpose(1, 2)  # [2, 5, 64], not contiguous
    torch.testing.assert_close(cusparselt_backend.cusparselt_linear(ours, x), ref(x), rtol=1e-5, atol=1e-5)


def test_packed_once_until_the_weights_change_and_search_once_per_row_bucket(searched):
    fake = searched
    ours, _ = layer_pair(64, 32)
    with torch.no_grad():
        for m in (3, 4, 3):  # one row bucket (<= 4)
            cusparselt_backend.cusparselt_linear(ours, torch.randn(m, 64))
        assert (fake.compressed, fake.searched) == (1, 1)
        cusparselt_backend.cusparselt_linear(ours, torch.randn(5, 64))  # bucket <= 8
        assert (fake.compressed, fake.searched) == (1, 2)
    cusparselt_backend.cusparselt_linear(ours, torch.randn(3, 64)).sum().backward()
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = cusparselt_backend.cusparselt_linear(ours, x)
    assert fake.compressed == 2  # repacked after the step, and the result uses the new weights
    torch.testing.assert_close(y, F.linear(x, ours.to_dense(), ours.bias), rtol=1e-5, atol=1e-5)
    # Pruned weights stayed exactly zero through the step.
    assert bool((ours.to_dense()[~ours.mask()] == 0).all())


def test_a_failing_search_falls_back_to_the_default_algorithm(searched, monkeypatch):
    def broken(*args):
        raise RuntimeError("no algorithm")

    monkeypatch.setattr(cusparselt, "_search", broken)
    ours, ref = layer_pair(64, 32)
    x = torch.randn(7, 64)
    torch.testing.assert_close(cusparselt_backend.cusparselt_linear(ours, x), ref(x), rtol=1e-5, atol=1e-5)
    assert list(cusparselt._ALG_IDS.values()) == [0]


def test_the_custom_op_passes_opcheck(fake):
    ours, _ = layer_pair(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    args = (x, ours.values, ours.metadata, ours.bias)
    torch.library.opcheck(torch.ops.lotus_kernels.cusparselt_matmul.default, args)


def test_why_not():
    def reason(pattern="2:4", device="cuda", dtype=torch.float16, features=(64, 64)):
        return cusparselt_backend.why_not(LayerSpec(pattern, torch.device(device), dtype, None, features))

    assert "'2:4' only" in reason(pattern="block")
    assert "CUDA" in reason(device="cpu")
    assert "no fp32" in reason(dtype=torch.float32)
    assert "multiples of 16" in reason(features=(64, 72))
    assert "cusparselt" in backends.backend_names()
    assert backends.backend_names().index("cusparselt") < backends.backend_names().index("dense")


def test_explicit_backend_on_cpu_says_why():
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32), "2:4", backend="cusparselt")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        layer(torch.randn(2, 64))


# ---------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 65])
@pytest.mark.parametrize("k,n", [(64, 32), (192, 96)])
def test_cuda_matches_the_reference(dtype, m, k, n):
    if cusparselt_backend.why_not(LayerSpec("2:4", torch.device("cuda"), dtype, None, (n, k))):
        pytest.skip(cusparselt_backend.why_not(LayerSpec("2:4", torch.device("cuda"), dtype, None, (n, k))))
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n).to("cuda", dtype)
    ours = SparseLinear.from_dense(linear, "2:4", backend="cusparselt", activation="gelu")
    ref = SparseLinear.from_dense(linear, "2:4", backend="reference", activation="gelu")
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.values.grad, ref.values.grad, rtol=tol, atol=tol * 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_rows_not_a_multiple_of_8_16_64_and_several_of_one_bucket(dtype):
    # Where fp16 crashed an H200 (ViT-B fc1, M=1581) under the old call: rows that are not multiples of 8, 16, 64,
    # and several row counts of one power-of-two bucket, each checked against fp64 (error <= 2x torch's + atol).
    from lotus_kernels.recipe.tools.gpu_check.steps import PROBE_ROWS

    if cusparselt_backend.why_not(LayerSpec("2:4", torch.device("cuda"), dtype, None, (3072, 768))):
        pytest.skip(cusparselt_backend.why_not(LayerSpec("2:4", torch.device("cuda"), dtype, None, (3072, 768))))
    assert any(m % 8 for m in PROBE_ROWS) and any(m % 16 for m in PROBE_ROWS if m % 8 == 0)
    assert any(m % 64 for m in PROBE_ROWS if m % 16 == 0) and len({backends.rows_bucket(m) for m in PROBE_ROWS}) < len(PROBE_ROWS)
    torch.manual_seed(0)
    linear = torch.nn.Linear(768, 3072).to("cuda", dtype)
    layer = SparseLinear.from_dense(linear, "2:4", backend="cusparselt")
    weight = layer.to_dense().detach()
    for m in PROBE_ROWS:
        x = torch.randn(m, 768, device="cuda", dtype=dtype, requires_grad=m == PROBE_ROWS[0])
        y = layer(x)
        exact = F.linear(x.detach().double(), weight.double(), layer.bias.detach().double())
        torch_same = F.linear(x.detach(), weight, layer.bias.detach())
        err, torch_err = ((t.double() - exact).norm() / exact.norm() for t in (y.detach(), torch_same))
        assert y.shape == (m, 3072) and y.is_contiguous() and err <= 2 * torch_err + 1e-3, (m, float(err), float(torch_err))
        if x.requires_grad:
            y.float().sum().backward()
            torch.testing.assert_close(x.grad.float(), weight.float().sum(0).expand(m, -1), rtol=2e-2, atol=2e-1)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_compiles_without_graph_breaks_packs_once_and_follows_updates(mode, monkeypatch):
    if cusparselt_backend.why_not(LayerSpec("2:4", torch.device("cuda"), torch.float16, None, (64, 64))):
        pytest.skip("no cuSPARSELt here")
    calls = []
    compress = cusparselt._compress
    monkeypatch.setattr(cusparselt, "_compress", lambda dense: calls.append(1) or compress(dense))
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 64).cuda().half(), "2:4", backend="cusparselt")
    compiled = torch.compile(layer, fullgraph=True, mode=mode)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(16, 64, device="cuda", dtype=torch.float16)
            torch.testing.assert_close(compiled(x), F.linear(x, layer.to_dense(), layer.bias), rtol=5e-3, atol=5e-3)
        assert len(calls) == 1
        layer.values.mul_(-1)  # a CUDA graph replay would miss this; the op is kept out of graphs
        torch.testing.assert_close(compiled(x), F.linear(x, layer.to_dense(), layer.bias), rtol=5e-3, atol=5e-3)
    assert len(calls) == 2


def test_backward_and_packing_never_sync_with_the_host(fake, monkeypatch):
    # The extension's validating decompress reads a flag back to the host; the training step must not call it.
    def synchronising_decompress(*args, **kwargs):
        raise AssertionError("ops.decompress_2to4 called on the training path")

    monkeypatch.setattr(lotus_kernels.ops, "decompress_2to4", synchronising_decompress)
    ours, ref = layer_pair(64, 32)
    x = torch.randn(5, 64, requires_grad=True)
    y = cusparselt_backend.cusparselt_linear(ours, x)
    y.backward(torch.ones_like(y))
    ref(x.detach()).sum().backward()
    torch.testing.assert_close(ours.values.grad, ref.values.grad, rtol=1e-5, atol=1e-5)


def test_a_searched_algorithm_an_other_row_count_refuses_falls_back_to_the_default(searched, monkeypatch):
    fake = searched
    used = []

    def picky_mm(packed, dense_t, bias, alg_id, transpose_result):
        used.append(alg_id)
        if alg_id != 0 and dense_t.shape[1] != 32:
            raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE")  # what the library says for an unsupported plan
        return FakeLibrary.sparse_mm(fake, packed, dense_t, bias, alg_id, transpose_result)

    monkeypatch.setattr(cusparselt, "_sparse_mm", picky_mm)
    ours, ref = layer_pair(64, 32)
    x32, x20 = torch.randn(32, 64), torch.randn(20, 64)  # one rows bucket (32): one search, one alg_id; 20 pads to 24
    torch.testing.assert_close(cusparselt_backend.cusparselt_linear(ours, x32), ref(x32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cusparselt_backend.cusparselt_linear(ours, x20), ref(x20), rtol=1e-5, atol=1e-5)
    assert fake.searched == 1 and used == [3, 3, 0]


# ------------------------------------------- the packed copy under torch.compile


class Wrapped(torch.nn.Module):
    """Calls the cusparselt backend directly (its why_not refuses a CPU when SparseLinear dispatches)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return cusparselt_backend.cusparselt_linear(self.layer, x)


@pytest.mark.parametrize("config", ["torch", "searched"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_inference_packs_once_and_searches_the_algorithm(fake, monkeypatch, config, compiler):
    monkeypatch.setattr(cusparselt, "_CONFIG", cusparselt.CONFIGS[config])
    ours, ref = layer_pair(64, 32)
    compiled = torch.compile(Wrapped(ours), backend=compiler, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(6, 64)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
        # Before: packed inside the graph on every call, and alg_id 0 without a search (searching configuration).
        assert (fake.compressed, fake.searched) == (1, 1 if config == "searched" else 0)
        ours.values.mul_(2)  # an in-place update the compiled graph cannot see
        x = torch.randn(6, 64)
        torch.testing.assert_close(compiled(x), F.linear(x, ours.to_dense(), ours.bias), rtol=1e-5, atol=1e-5)
    assert fake.compressed == 2


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_repacks_once_per_step_and_learns_the_same(fake, compiler):
    ours, ref = layer_pair(64, 32)
    compiled = torch.compile(Wrapped(ours), backend=compiler, fullgraph=True)
    opt, opt_ref = torch.optim.SGD(ours.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(9, 64)
        for module, fn, o in ((ours, compiled, opt), (ref, ref, opt_ref)):
            o.zero_grad()
            fn(x).square().mean().backward()
            o.step()
        assert fake.compressed == step + 1
    torch.testing.assert_close(ours.values, ref.values, rtol=1e-5, atol=1e-6)
    assert bool((ours.to_dense()[~ours.mask()] == 0).all())


def test_autocast_packs_the_cast_weight_once(fake):
    ours, ref = layer_pair(64, 32)
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ys = [cusparselt_backend.cusparselt_linear(ours, x) for _ in range(3)]
        y_ref = ref(x)
    assert ys[0].dtype == torch.bfloat16 and fake.compressed == 1
    torch.testing.assert_close(ys[-1].float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    assert ours.values.dtype == torch.float32  # the stored weight is never cast in place


def test_the_op_is_kept_out_of_cuda_graphs():
    import inspect

    can_tag = hasattr(torch.Tag, "cudagraph_unsafe") and "tags" in inspect.signature(torch.library.custom_op).parameters
    assert bool(weight_cache.CUDAGRAPH_UNSAFE) == can_tag  # tagged wherever this torch allows it
    if can_tag:
        assert torch.Tag.cudagraph_unsafe in torch.ops.lotus_kernels.cusparselt_matmul.default.tags
