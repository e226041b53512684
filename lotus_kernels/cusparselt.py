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
and cached on the module until the weights change (an optimizer step, a
load): never per call. Under a torch.compile trace it is packed inside the
graph on every call instead, since a cache baked into a graph would go stale.

The library algorithm (alg_id) is chosen once per (weight shape, dtype,
rows of x rounded up to a power of two) by ``torch._cslt_sparse_mm_search``.

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
from .mask_compaction import decompress_2to4_ref
from .backends import Backend, LayerSpec, apply_activation, autocast_operands, cached_weight, register_backend, rows_bucket

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


@torch.library.custom_op("lotus_kernels::cusparselt_matmul", mutates_args=())
def _cusparselt_matmul(
    x: torch.Tensor, packed: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None, alg_id: int
) -> torch.Tensor:
    # values/metadata are inputs only for the backward (packed is derived from them).
    m = x.shape[0]
    x_t = _pad_rows(x).t()
    try:
        y = _sparse_mm(packed, x_t, bias, alg_id)
    except RuntimeError:
        # The searched algorithm is shared by every M of a power-of-two bucket; should
        # one M refuse it, the library's default algorithm (0) runs every shape.
        if alg_id == 0:
            raise
        y = _sparse_mm(packed, x_t, bias, 0)
    return y[:m].contiguous() if y.shape[0] != m else y


@_cusparselt_matmul.register_fake
def _(x, packed, values, metadata, bias, alg_id):
    return x.new_empty((x.shape[0], values.shape[0]))


def _setup(ctx, inputs, output):
    x, _, values, metadata, bias, _ = inputs
    ctx.save_for_backward(x, values, metadata)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, values, metadata = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _dense_weight(values, metadata)
    if ctx.needs_input_grad[2]:
        grad_values = ops.semi_structured_values_grad(grad, x, metadata)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return grad_x, None, grad_values, None, grad_bias, None


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
    """The module's 2:4 weight in cuSPARSELt's packed format, in ``dtype`` (default: the weight's).

    Cached per dtype until the weights change.
    """
    dtype = dtype or module.values.dtype

    def pack():
        return _compress(_dense_weight(module.values.detach().to(dtype), module.metadata))

    if torch.compiler.is_compiling():
        return pack()
    return cached_weight(module, f"cusparselt-{dtype}", pack)


def _alg_id(packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> int:
    if torch.compiler.is_compiling():
        return 0
    key = (tuple(packed.shape), x.shape[1], x.dtype, x.device, rows_bucket(x.shape[0]), bias is not None)
    if key not in _ALG_IDS:
        try:
            _ALG_IDS[key] = _search(packed, _pad_rows(x).t(), bias)
        except RuntimeError:
            _ALG_IDS[key] = 0  # the library's default algorithm always runs
    return _ALG_IDS[key]


def cusparselt_linear(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through cuSPARSELt: x [..., in_features] -> [..., out_features] (differentiable)."""
    x, values, bias = autocast_operands(x, module.values, module.bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        packed = packed_weight(module, x2.dtype)
        y = _cusparselt_matmul(x2, packed, values, module.metadata, bias, _alg_id(packed, x2, bias))
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
