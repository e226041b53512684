"""The "triton" backend of SparseLinear: our Triton kernels for patterns "block" and "2:4".

Registering it does not import triton (the kernels are imported when they first run).
"""

from __future__ import annotations

import torch

from .._shared import INTERPRET, KERNEL_DTYPES, TRITON_INSTALLED
from ..ops.block_sparse_matmul import BLOCK_SPARSE_SIZES, block_sparse_matmul
from ..ops.semi_structured_matmul import semi_structured_matmul
from .linear import autocast_operands, register_backend
from .registry import Backend, LayerSpec


def _triton_why_not(spec: LayerSpec) -> str | None:
    if spec.pattern not in ("block", "2:4"):
        return "runs patterns 'block' and '2:4'"
    if spec.pattern == "block" and (spec.block_size is None or any(b not in BLOCK_SPARSE_SIZES for b in spec.block_size)):
        return f"block sizes must be in {BLOCK_SPARSE_SIZES}, got {spec.block_size}"
    if spec.dtype not in KERNEL_DTYPES:
        return f"dtype must be one of {KERNEL_DTYPES}, got {spec.dtype}"
    return device_reason(spec.device, spec.dtype)


def device_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when our Triton kernels can run on tensors of this device and dtype, else why not
    (every Triton backend asks this: SparseLinear's here, patch-drop attention's in ``backends.attention``)."""
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu" or not INTERPRET:
        return (
            f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1: the Triton interpreter, slow, for tests), "
            f"got a {device.type} tensor"
        )
    if dtype == torch.bfloat16:
        return "the Triton interpreter mishandles bfloat16; use fp16/fp32 on CPU"
    return None


def _triton_forward(module, x: torch.Tensor) -> torch.Tensor:
    x, values, bias = autocast_operands(x, module.values, module.bias)
    with torch.autocast(x.device.type, enabled=False):
        if module.pattern == "2:4":
            return semi_structured_matmul(x, values, module.metadata, bias, module.activation)
        return block_sparse_matmul(
            x, values, module.crow_indices, module.col_indices, module.out_features, bias, module.activation,
            structure=module.block_structure(),
        )


register_backend(
    Backend(
        name="triton",
        description="Triton kernels: block-sparse matmul (walks only stored blocks) and 2:4 matmul "
        "(reads the compressed weight), forward and backward",
        why_not=_triton_why_not,
        forward=_triton_forward,
        # On CPU it is the interpreter: explicit backend="triton" only.
        auto=lambda spec: spec.device.type == "cuda",
    )
)
