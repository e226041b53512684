"""The "cusparselt" backend of SparseLinear(pattern="2:4"): NVIDIA cuSPARSELt through PyTorch's binding.

We use the well-kept library where it is fastest rather than rewrite it; "auto"
races it against our Triton kernel and the dense matmul per shape (see
lotus_kernels.backends), so it runs only where it measured faster.

Layout. cuSPARSELt wants the sparse operand first and in its own packed
format (kept values and metadata in one opaque buffer), so for
y = x @ W^T + b we compute (W @ x^T)^T:
``torch._cslt_sparse_mm(packed_W [N, K], x^T [K, M], bias, transpose_result=True)``
returns [M, N] directly; x^T is a view of a row-major x (no copy). The packed
weight is made by ``torch._cslt_compress`` from our (values, metadata) once
per weight state (after an optimizer step, a load, a re-prune), never per
call: the op keeps it, keyed on the stored parameter, and looks it up at run
time, so a torch.compile'd model packs once too instead of in every call.

The library algorithm (alg_id) is chosen once per (weight shape, dtype,
rows of x rounded up to a power of two) by ``torch._cslt_sparse_mm_search``,
also at run time, compiled or not.

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

import torch
import torch.nn.functional as F

from . import ops
from .backends import Backend, LayerSpec, apply_activation, autocast_input, register_backend, rows_bucket
from .mask_compaction import decompress_2to4_ref
from .weight_cache import CUDAGRAPH_UNSAFE, derived

CUSPARSELT_DTYPES = (torch.float16, torch.bfloat16)
# torch.sparse.SparseSemiStructuredTensorCUSPARSELT's minimum shapes for fp16/bf16:
# the sparse operand's rows and columns multiples of 16, the dense one's of 8.
WEIGHT_MULTIPLE = 16
ROW_MULTIPLE = 8
MIN_CAPABILITY = (8, 0)

_ALG_IDS: dict[tuple, int] = {}
_DEVICE_OK: dict[int, str | None] = {}


# ----------------------------------------------------------- the library
# The three calls into cuSPARSELt, kept apart so tests on a CPU can stand in
# for the library and check everything around it (padding, transposes, bias,
# caching, autograd).


def _compress(dense: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(dense)


def _sparse_mm(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None, alg_id: int) -> torch.Tensor:
    return torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=True, alg_id=alg_id)


def _search(packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> int:
    return int(torch._cslt_sparse_mm_search(packed, dense_t, bias=bias, transpose_result=True))


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
    (lotus_kernels.weight_cache says how and why).
    """
    return derived(f"cusparselt-{dtype}", values, (metadata,), lambda: _compress(_dense_weight(values.detach().to(dtype), metadata)))


def _alg_id(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> int:
    """cuSPARSELt's fastest algorithm for this product, searched once per (shape, dtype, rows bucket)."""
    key = (tuple(weight.shape), x.shape[1], x.dtype, x.device, rows_bucket(x.shape[0]), bias is not None)
    if key not in _ALG_IDS:
        try:
            _ALG_IDS[key] = _search(weight, _pad_rows(x).t(), bias)
        except RuntimeError:
            _ALG_IDS[key] = 0  # the library's default algorithm always runs
    return _ALG_IDS[key]


@torch.library.custom_op("lotus_kernels::cusparselt_matmul", mutates_args=(), **CUDAGRAPH_UNSAFE)
def _cusparselt_matmul(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T + bias for the 2:4 weight W of (values [N, K/2], metadata).

    x and bias are in the compute dtype; values is the stored parameter in
    its own dtype (cast inside, once per weight state, with the packing).
    """
    m = x.shape[0]
    weight = packed(values, metadata, x.dtype)
    alg_id = _alg_id(weight, x, bias)
    x_t = _pad_rows(x).t()
    try:
        y = _sparse_mm(weight, x_t, bias, alg_id)
    except RuntimeError:
        # The searched algorithm is shared by every M of a power-of-two bucket; should
        # one M refuse it, the library's default algorithm (0) runs every shape.
        if alg_id == 0:
            raise
        y = _sparse_mm(weight, x_t, bias, 0)
    return y[:m].contiguous() if y.shape[0] != m else y


@_cusparselt_matmul.register_fake
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
        grad_values = ops.semi_structured_values_grad(grad, x, metadata).to(values.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return grad_x, grad_values, None, grad_bias


_cusparselt_matmul.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------ the backend


def _device_reason(device: torch.device) -> str | None:
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


def why_not(spec: LayerSpec) -> str | None:
    """None when the cusparselt backend can run a layer of this spec, else why not."""
    if spec.pattern != "2:4":
        return "runs pattern '2:4' only"
    if spec.device.type != "cuda":
        return "needs a CUDA device (NVIDIA cuSPARSELt)"
    if spec.dtype not in CUSPARSELT_DTYPES:
        return f"dtype must be one of {CUSPARSELT_DTYPES} (torch's cuSPARSELt binding has no fp32), got {spec.dtype}"
    if spec.features is not None and any(f % WEIGHT_MULTIPLE for f in spec.features):
        return f"out_features and in_features must be multiples of {WEIGHT_MULTIPLE}, got {spec.features}"
    if torch.compiler.is_compiling():
        return _DEVICE_OK.get(spec.device.index or 0)  # decided eagerly before the trace, or assumed fine
    return _device_reason(spec.device)


def packed_weight(module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The module's 2:4 weight in cuSPARSELt's packed format, in ``dtype`` (default: the weight's); see ``packed``."""
    return packed(module.values, module.metadata, dtype or module.values.dtype)


def cusparselt_linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through cuSPARSELt: x [..., in_features] -> [..., out_features] (differentiable)."""
    x, bias = autocast_input(x, module.bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        # The stored values go in uncast: the op keys its packed copy on them.
        y = _cusparselt_matmul(x2, module.values, module.metadata, bias)
    return apply_activation(module, y.reshape(*lead, module.out_features))


register_backend(
    Backend(
        name="cusparselt",
        description="NVIDIA cuSPARSELt 2:4 matmul via torch._cslt_sparse_mm (packed once per weight, algorithm "
        "searched once per shape), forward and backward",
        why_not=why_not,
        forward=cusparselt_linear,
    )
)
