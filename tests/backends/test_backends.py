"""How "auto" decides: separate decisions for inference and training, and no blind guess under torch.compile.

The decision logic runs with a fake CUDA input and an injected timer (nothing
launches); the real timer's "no gradient leaks into .grad" is a CUDA test.
"""

import pytest
import torch

from lotus_kernels import SparseLinear, backends


class FakeCudaInput:  # decision logic only: nothing runs on it
    device = torch.device("cuda")

    def __init__(self, *shape):
        self.shape = torch.Size(shape)


SPEC = backends.LayerSpec("block", torch.device("cuda"), torch.float16, (16, 16))


@pytest.fixture
def layer(monkeypatch):
    monkeypatch.setattr(backends.linear, "_AUTO_CHOICE", {})
    return SparseLinear.from_dense(torch.nn.Linear(64, 64), "block", sparsity=0.5, block_size=16)


def test_training_is_decided_on_forward_plus_backward_apart_from_inference(layer):
    seen = []

    def timer(backend, module, x):
        # The default timer times the backward too exactly when grad is enabled here.
        seen.append((backend.name, torch.is_grad_enabled()))
        # Triton wins the forward alone, loses forward + backward.
        return {("triton", False): 1.0, ("dense", False): 2.0, ("triton", True): 5.0, ("dense", True): 3.0}[seen[-1]]

    with torch.no_grad():
        assert backends.select_for(layer, FakeCudaInput(256, 64), SPEC, timer).name == "triton"
    assert backends.select_for(layer, FakeCudaInput(256, 64), SPEC, timer).name == "dense"  # values require grad
    assert sorted(seen) == [("dense", False), ("dense", True), ("triton", False), ("triton", True)]
    modes = sorted(key[-1] for key in backends.auto_choices())
    assert modes == ["fwd", "fwd+bwd"]
    # Frozen weights (values do not require grad) are inference even with grad enabled: the cached decision, no timing.
    layer.values.requires_grad_(False)
    assert backends.select_for(layer, FakeCudaInput(256, 64), SPEC, timer).name == "triton"
    assert len(seen) == 4


def test_under_torch_compile_an_undecided_auto_runs_dense_and_a_decided_one_its_choice(layer, monkeypatch):
    def timer(backend, module, x):
        raise AssertionError("no timing inside a trace")

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert backends.select_for(layer, FakeCudaInput(32, 64), SPEC, timer).name == "dense"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with torch.no_grad():
        assert backends.select_for(layer, FakeCudaInput(32, 64), SPEC, lambda b, m, x: {"triton": 1.0, "dense": 2.0}[b.name]).name == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert backends.select_for(layer, FakeCudaInput(32, 64), SPEC, timer).name == "triton"


@pytest.mark.cuda
def test_timing_a_training_step_leaves_no_gradient_behind():
    layer = SparseLinear.from_dense(torch.nn.Linear(256, 256), "block", sparsity=0.5, block_size=32).cuda()
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    for backend in backends.auto_candidates(layer.spec()):
        assert backends.time_backend_ms(backend, layer, x) > 0
    assert layer.values.grad is None and layer.bias.grad is None and x.grad is None
