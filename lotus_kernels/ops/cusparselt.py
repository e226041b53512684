"""The cuSPARSELt 2:4 matmul op: NVIDIA cuSPARSELt through PyTorch's binding (the "cusparselt" backend of
SparseLinear(pattern="2:4") is ``lotus_kernels.backends.cusparselt``).

We use the well-kept library where it is fastest rather than rewrite it; "auto"
races it against our Triton kernel and the dense matmul per shape (see
lotus_kernels.backends.linear), so it runs only where it measured faster.

Layout. cuSPARSELt wants the sparse operand first and in its own packed
format (kept values and metadata in one opaque buffer), so for
y = x @ W^T + b we compute (W @ x^T)^T with ``torch._cslt_sparse_mm(packed_W
[N, K], x^T [K, M], bias)``; x^T is a view of a row-major x (no copy). The
packed weight is made by ``torch._cslt_compress`` from our (values, metadata)
once per weight state (after an optimizer step, a load, a re-prune), never
per call: the op keeps it, keyed on the stored parameter, and looks it up at
run time, so a torch.compile'd model packs once too instead of in every call.

How the library is called (``CallConfig``, chosen by ``LOTUS_CUSPARSELT``,
read at import). An H200 run (torch 2.11) of our earlier call, with
``transpose_result=True`` (the library writes [M, N] directly) and an
``alg_id`` from ``torch._cslt_sparse_mm_search``, hit "illegal instruction"
in fp16 on its first call (M=1581, K=768, N=3072) and left the process's
CUDA context dead; bf16 worked, and so did torch's own semi-structured path
in fp16 on the same shape. A device fault cannot be caught, so until a GPU
run proves another configuration (``lotus gpu-check`` probes each in its own
process) we call the library exactly as torch's path does:
- "torch" (default): ``transpose_result=False``, the default algorithm
  (alg_id 0, no search), result [N, M] transposed back and made contiguous
  (one copy of y: the price of the proven call);
- "transposed": ``transpose_result=True``, alg_id 0 (no copy of y);
- "searched": ``transpose_result=True`` and alg_id searched once per
  (weight shape, dtype, rows of x rounded up to a power of two): the call
  that crashed; for probing;
- "off": the backend declines every layer.
"auto" races cuSPARSELt only in a configuration listed in ``PROVEN``;
``backend="cusparselt"`` runs whichever is chosen.

Constraints (torch's cuSPARSELt binding; checked by ``why_not``): CUDA
device of compute capability >= 8.0 and torch built with cuSPARSELt; fp16 or
bf16 (fp32 is not offered for Hopper, and torch no longer exposes it);
out_features and in_features multiples of 16. Rows of x are padded to a
multiple of 8 (the dense operand's minimum) and the padding sliced off.

Training: y = x W^T + b as a custom op with autograd; dx = dy @ W with the
decompressed dense weight (pure torch scatter, no host sync; cuBLAS), dW dense (cuBLAS) then only the kept
slots, as the Triton path; the exact GELU epilogue runs as a separate op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._shared import rows_bucket
from ..layouts import decompress_2to4_ref
from .semi_structured_matmul import semi_structured_values_grad
from .weight_cache import CUDAGRAPH_UNSAFE, derived

CUSPARSELT_DTYPES = (torch.float16, torch.bfloat16)
# torch.sparse.SparseSemiStructuredTensorCUSPARSELT's minimum shapes for fp16/bf16:
# the sparse operand's rows and columns multiples of 16, the dense one's of 8.
WEIGHT_MULTIPLE = 16
ROW_MULTIPLE = 8
MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class CallConfig:
    """How ``torch._cslt_sparse_mm`` is called (see the module docstring)."""

    name: str
    transpose_result: bool  # the library writes y [M, N] itself (else y^T [N, M], transposed back with a copy)
    search: bool  # alg_id searched per (shape, dtype, rows bucket); else the library's default, 0


CONFIGS = {
    "torch": CallConfig("torch", transpose_result=False, search=False),
    "transposed": CallConfig("transposed", transpose_result=True, search=False),
    "searched": CallConfig("searched", transpose_result=True, search=True),
}
# Configurations a GPU run has shown to work in fp16 and bf16 (torch's own call: an H200, torch 2.11).
# Add one here only with a committed `lotus gpu-check` result that probed it on that GPU.
PROVEN = ("torch",)
ENV = "LOTUS_CUSPARSELT"


def _check_name(name: str, what: str) -> str:
    if name != "off" and name not in CONFIGS:
        raise ValueError(f"{what} must be one of {[*CONFIGS, 'off']}, got {name!r}")
    return name


# Read once, at import, like TRITON_INTERPRET (set_call_config changes it in a running
# process). A bad value must not break `import lotus_kernels`: the backend declines
# every layer and says why (why_not), and an explicit backend="cusparselt" raises it.
try:
    _CONFIG: CallConfig | None = CONFIGS.get(_check_name(os.environ.get(ENV, "torch"), ENV))
    _CONFIG_ERROR: str | None = None
except ValueError as e:
    _CONFIG, _CONFIG_ERROR = None, str(e)
_ALG_IDS: dict[tuple, int] = {}
_DEVICE_OK: dict[int, str | None] = {}


def call_config() -> CallConfig | None:
    """The configuration in use (None: the backend is off)."""
    return _CONFIG


def set_call_config(name: str) -> None:
    """Use configuration ``name`` ("torch", "transposed", "searched" or "off") from now on in this process."""
    global _CONFIG, _CONFIG_ERROR
    _CONFIG, _CONFIG_ERROR = CONFIGS.get(_check_name(name, "the cuSPARSELt configuration")), None


# ----------------------------------------------------------- the library
# The three calls into cuSPARSELt, kept apart so tests on a CPU can stand in
# for the library and check everything around it (padding, transposes, bias,
# caching, autograd).


def _compress(dense: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(dense)


def _sparse_mm(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None, alg_id: int, transpose_result: bool) -> torch.Tensor:
    return torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=transpose_result, alg_id=alg_id)


def _search(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None, transpose_result: bool) -> int:
    return int(torch._cslt_sparse_mm_search(packed, dense_t, bias=bias, transpose_result=transpose_result))


# ------------------------------------------------------------- the op


def _dense_weight(values: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] weight of (values, metadata), without validating the metadata again.

    SparseLinear checked it when the layout was made or loaded; the
    extension's validating decompress reads a flag back to the host, which
    would cost a sync per layer per training step and break CUDA-graph capture.
    """
    return decompress_2to4_ref(values, metadata, validate=False)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] with zero rows appended up to a multiple of ROW_MULTIPLE (the dense operand's minimum)."""
    pad = -x.shape[0] % ROW_MULTIPLE
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def packed(values: torch.Tensor, metadata: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 2:4 weight (values [N, K/2], metadata) in cuSPARSELt's packed format, in ``dtype``.

    Packed once per weight state and found at run time, compiled or not
    (lotus_kernels.ops.weight_cache says how and why).
    """
    return derived(f"cusparselt-{dtype}", values, (metadata,), lambda: _compress(_dense_weight(values.detach().to(dtype), metadata)))


def _alg_id(config: CallConfig, weight: torch.Tensor, x_t: torch.Tensor, rows: int, bias: torch.Tensor | None) -> int:
    """The algorithm for this product: 0, or under a searching config the library's fastest, searched once per
    (shape, dtype, rows of x rounded up to a power of two, config)."""
    if not config.search:
        return 0
    key = (tuple(weight.shape), x_t.shape[0], x_t.dtype, x_t.device, rows_bucket(rows), bias is not None, config.name)
    if key not in _ALG_IDS:
        try:
            _ALG_IDS[key] = _search(weight, x_t, bias, config.transpose_result)
        except RuntimeError:
            _ALG_IDS[key] = 0  # the library's default algorithm always runs
    return _ALG_IDS[key]


def _matmul(config: CallConfig, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] (contiguous) = x [M, K] @ W^T + bias through the library, W packed [N, K]."""
    m = x.shape[0]
    x_t = _pad_rows(x).t()  # [K, M padded]: a view of the row-major padded x, as torch's own path passes it
    alg_id = _alg_id(config, weight, x_t, m, bias)
    try:
        y = _sparse_mm(weight, x_t, bias, alg_id, config.transpose_result)
    except RuntimeError:
        # A searched algorithm is shared by every M of a power-of-two bucket; should
        # one M refuse it, the library's default algorithm (0) runs every shape.
        if alg_id == 0:
            raise
        y = _sparse_mm(weight, x_t, bias, 0, config.transpose_result)
    if not config.transpose_result:
        y = y.t()  # the library wrote y^T [N, M padded]
    y = y[:m] if y.shape[0] != m else y
    return y.contiguous()


@torch.library.custom_op("lotus_kernels::cusparselt_matmul", mutates_args=(), **CUDAGRAPH_UNSAFE)
def cusparselt_matmul(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T + bias for the 2:4 weight W of (values [N, K/2], metadata).

    x and bias are in the compute dtype; values is the stored parameter in
    its own dtype (cast inside, once per weight state, with the packing).
    """
    config = _CONFIG
    if config is None:
        raise RuntimeError(f"the cuSPARSELt backend is off: {_CONFIG_ERROR or f'{ENV}=off'}")
    return _matmul(config, packed(values, metadata, x.dtype), x, bias)


@cusparselt_matmul.register_fake
def _(x, values, metadata, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


def _setup(ctx, inputs, output):
    x, values, metadata, bias = inputs
    ctx.save_for_backward(x, values, metadata)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, values, metadata = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _dense_weight(values.to(grad.dtype), metadata)
    if ctx.needs_input_grad[1]:
        grad_values = semi_structured_values_grad(grad, x, metadata).to(values.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return grad_x, grad_values, None, grad_bias


cusparselt_matmul.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------- what the backend asks


def config_error() -> str | None:
    """Why the configuration from the environment was refused (the backend is then off), or None."""
    return _CONFIG_ERROR


def device_reason(device: torch.device) -> str | None:
    """None when cuSPARSELt can run on this CUDA device, else why not (asked of the device once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_OK:
        backend = getattr(torch.backends, "cusparselt", None)
        if backend is None or not backend.is_available():
            _DEVICE_OK[index] = "this torch build has no cuSPARSELt"
        elif torch.cuda.get_device_capability(index) < MIN_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(index)
            _DEVICE_OK[index] = f"cuSPARSELt needs compute capability >= 8.0, device is sm_{major}{minor}"
        else:
            _DEVICE_OK[index] = None
    return _DEVICE_OK[index]


def known_device_reason(device: torch.device) -> str | None:
    """What ``device_reason`` found before, without asking the device (inside a torch.compile trace)."""
    return _DEVICE_OK.get(device.index or 0)


def packed_weight(module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A 2:4 SparseLinear's weight in cuSPARSELt's packed format, in ``dtype`` (default: the weight's); see ``packed``."""
    return packed(module.values, module.metadata, dtype or module.values.dtype)
