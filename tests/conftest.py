"""Test setup: Triton runs on CPU tensors through its interpreter, and
GPU-only tests carry the `cuda` marker (skipped without a CUDA device).

TRITON_INTERPRET must be set before triton is first imported. It defaults to
1 here (CI has no GPU); on a GPU machine run `TRITON_INTERPRET=0 pytest tests/`
and the Triton tests run their kernels on CUDA tensors instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Compiled kernels (TRITON_INTERPRET=0) run one config each, untimed: correctness does not depend on the
# tile, and autotuning every config of every kernel variant is what made the CUDA suite too slow for a lease.
os.environ.setdefault("LOTUS_AUTOTUNE", "off")
# "auto" backend decisions are not persisted from tests (a test opts in with a tmp dir).
os.environ["LOTUS_AUTO_CACHE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from lotus_kernels import _extension  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Decided when tests run, not at import: no GPU query at collection of the package.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _extension_built():
    # Everything below the ops layer needs the compiled extension; a missing
    # build must fail loudly here rather than as dozens of confusing errors.
    if not _extension.is_built():
        pytest.exit(f"lotus_kernels._C is not built: {_extension.load_error()}", returncode=1)


def triton_device() -> str:
    """Where Triton kernel tests put their tensors: the interpreter needs CPU tensors, compiled kernels CUDA ones."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def compile_for_gpu(script: str) -> None:
    """Run a triton.compile script without the interpreter (a subprocess: the env is read at import)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def devices():
    """CPU always; CUDA as a marked parameter."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def assert_compiled_backward_matches_eager(layer, x: torch.Tensor) -> None:
    """A deep copy of ``layer`` under torch.compile (aot_eager, fullgraph) gives the eager
    output and the gradients of x, values and bias to 1e-6."""
    import copy

    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    grad = torch.randn(*x.shape[:-1], layer.out_features, device=x.device, dtype=x.dtype)
    results = []
    for module, fn in ((layer, layer), (compiled_layer, compiled)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, module.values.grad, module.bias.grad))
    for eager, comp in zip(*results):
        assert comp is not None and torch.allclose(comp, eager, rtol=0, atol=1e-6), (comp - eager).abs().max()


def strided(t: torch.Tensor, how: str = "every_other") -> torch.Tensor:
    """The same values as t in a non-contiguous layout (1-d tensors: always every other element)."""
    if how == "transposed_back" and t.dim() >= 2:  # e.g. a weight stored transposed and read back through .t()
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:  # every other element of a wider buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        view = wide[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view
