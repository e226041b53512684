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

from lotus_kernels import SparseLinear, backends, cusparselt
from lotus_kernels.backends import LayerSpec


class FakeLibrary:
    """Stands in for torch._cslt_*: "packed" is the dense 2:4 weight itself."""

    def __init__(self):
        self.compressed, self.searched, self.mm_rows = 0, 0, []

    def compress(self, dense):
        groups = dense.reshape(dense.shape[0], -1, 4)
        assert int((groups != 0).sum(-1).max()) <= 2, "the library only takes 2:4 weights"
        self.compressed += 1
        return dense.clone()

    def sparse_mm(self, packed, dense_t, bias, alg_id):
        assert dense_t.shape[0] == packed.shape[1] and dense_t.shape[1] % cusparselt.ROW_MULTIPLE == 0
        self.mm_rows.append(dense_t.shape[1])
        y = (packed @ dense_t).t()  # transpose_result=True: [M, N]
        return (y + bias if bias is not None else y).contiguous()

    def search(self, packed, dense_t, bias):
        self.searched += 1
        return 3


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibrary()
    monkeypatch.setattr(cusparselt, "_compress", lib.compress)
    monkeypatch.setattr(cusparselt, "_sparse_mm", lib.sparse_mm)
    monkeypatch.setattr(cusparselt, "_search", lib.search)
    monkeypatch.setattr(cusparselt, "_ALG_IDS", {})
    return lib


def layer_pair(k, n, bias=True, activation="none", seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias)
    ours = SparseLinear.from_dense(linear, "2:4", backend="reference", activation=activation)
    ref = SparseLinear.from_dense(linear, "2:4", backend="reference", activation=activation)
    return ours, ref


@pytest.mark.parametrize("m", [1, 3, 65])
@pytest.mark.parametrize("k,n", [(64, 32), (192, 96)])
@pytest.mark.parametrize("bias,activation", [(True, "none"), (False, "none"), (True, "gelu")])
def test_forward_and_backward_match_the_reference(fake, m, k, n, bias, activation):
    ours, ref = layer_pair(k, n, bias, activation)
    x = torch.randn(m, k, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = cusparselt.cusparselt_linear(ours, x)
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
    # Rows padded up to the dense operand's minimum multiple, then sliced off.
    assert fake.mm_rows == [m + (-m % 8)]


def test_leading_dims_and_noncontiguous_input(fake):
    ours, ref = layer_pair(64, 48)
    x = torch.randn(2, 64, 5).transpose(1, 2)  # [2, 5, 64], not contiguous
    torch.testing.assert_close(cusparselt.cusparselt_linear(ours, x), ref(x), rtol=1e-5, atol=1e-5)


def test_packed_once_until_the_weights_change_and_search_once_per_row_bucket(fake):
    ours, _ = layer_pair(64, 32)
    with torch.no_grad():
        for m in (3, 4, 3):  # one row bucket (<= 4)
            cusparselt.cusparselt_linear(ours, torch.randn(m, 64))
        assert (fake.compressed, fake.searched) == (1, 1)
        cusparselt.cusparselt_linear(ours, torch.randn(5, 64))  # bucket <= 8
        assert (fake.compressed, fake.searched) == (1, 2)
    cusparselt.cusparselt_linear(ours, torch.randn(3, 64)).sum().backward()
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = cusparselt.cusparselt_linear(ours, x)
    assert fake.compressed == 2  # repacked after the step, and the result uses the new weights
    torch.testing.assert_close(y, F.linear(x, ours.to_dense(), ours.bias), rtol=1e-5, atol=1e-5)
    # Pruned weights stayed exactly zero through the step.
    assert bool((ours.to_dense()[~ours.mask()] == 0).all())


def test_a_failing_search_falls_back_to_the_default_algorithm(fake, monkeypatch):
    def broken(*args):
        raise RuntimeError("no algorithm")

    monkeypatch.setattr(cusparselt, "_search", broken)
    ours, ref = layer_pair(64, 32)
    x = torch.randn(7, 64)
    torch.testing.assert_close(cusparselt.cusparselt_linear(ours, x), ref(x), rtol=1e-5, atol=1e-5)
    assert list(cusparselt._ALG_IDS.values()) == [0]


def test_the_custom_op_passes_opcheck(fake):
    ours, _ = layer_pair(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    packed = cusparselt.packed_weight(ours)
    args = (x, packed, ours.values, ours.metadata, ours.bias, 0)
    torch.library.opcheck(torch.ops.lotus_kernels.cusparselt_matmul.default, args)


def test_why_not():
    def reason(pattern="2:4", device="cuda", dtype=torch.float16, features=(64, 64)):
        return cusparselt.why_not(LayerSpec(pattern, torch.device(device), dtype, None, features))

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
    if cusparselt.why_not(LayerSpec("2:4", torch.device("cuda"), dtype, None, (n, k))):
        pytest.skip(cusparselt.why_not(LayerSpec("2:4", torch.device("cuda"), dtype, None, (n, k))))
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
def test_cuda_compiles_without_graph_breaks():
    if cusparselt.why_not(LayerSpec("2:4", torch.device("cuda"), torch.float16, None, (64, 64))):
        pytest.skip("no cuSPARSELt here")
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 64).cuda().half(), "2:4", backend="cusparselt")
    x = torch.randn(16, 64, device="cuda", dtype=torch.float16)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, layer.to_dense(), layer.bias), rtol=5e-3, atol=5e-3)


def test_backward_and_packing_never_sync_with_the_host(fake, monkeypatch):
    # The extension's validating decompress reads a flag back to the host; the training step must not call it.
    def synchronising_decompress(*args, **kwargs):
        raise AssertionError("ops.decompress_2to4 called on the training path")

    monkeypatch.setattr(cusparselt.ops, "decompress_2to4", synchronising_decompress)
    ours, ref = layer_pair(64, 32)
    x = torch.randn(5, 64, requires_grad=True)
    y = cusparselt.cusparselt_linear(ours, x)
    y.backward(torch.ones_like(y))
    ref(x.detach()).sum().backward()
    torch.testing.assert_close(ours.values.grad, ref.values.grad, rtol=1e-5, atol=1e-5)


def test_a_searched_algorithm_an_other_row_count_refuses_falls_back_to_the_default(fake, monkeypatch):
    used = []

    def picky_mm(packed, dense_t, bias, alg_id):
        used.append(alg_id)
        if alg_id != 0 and dense_t.shape[1] != 32:
            raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE")  # what the library says for an unsupported plan
        return FakeLibrary.sparse_mm(fake, packed, dense_t, bias, alg_id)

    monkeypatch.setattr(cusparselt, "_sparse_mm", picky_mm)
    ours, ref = layer_pair(64, 32)
    x32, x20 = torch.randn(32, 64), torch.randn(20, 64)  # one rows bucket (32): one search, one alg_id; 20 pads to 24
    torch.testing.assert_close(cusparselt.cusparselt_linear(ours, x32), ref(x32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cusparselt.cusparselt_linear(ours, x20), ref(x20), rtol=1e-5, atol=1e-5)
    assert fake.searched == 1 and used == [3, 3, 0]
