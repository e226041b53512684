"""2:4 semi-structured matmul: y = act(x @ W^T + b) with W as compress_2to4's (values, metadata) (Triton, forward and backward).

The op is ``torch.ops.lotus_kernels.semi_structured_matmul`` (plus ``_dx``), a
custom op with a fake and autograd; its kernels are
``lotus_kernels.kernels.semi_structured_matmul`` with ``semi_structured_matmul_ref``.
SparseLinear(pattern="2:4") calls it through the "triton" backend; the
"cusparselt" backend (``ops.cusparselt``) shares ``semi_structured_values_grad``.
"""

from __future__ import annotations

import torch

from .._shared import ACTIVATIONS, KERNEL_DTYPES
from ..layouts import GROUPS_PER_META_WORD, check_2to4_metadata, unpack_2to4_slots
from . import weight_cache
from ._common import CHECKED, check_on_device_of_x, check_tensor, grad_before_activation


def _ss_kernels():
    from ..kernels import semi_structured_matmul

    return semi_structured_matmul


SEMI_STRUCTURED_DTYPES = KERNEL_DTYPES


@torch.library.custom_op("lotus_kernels::semi_structured_matmul", mutates_args=())
def _semi_structured_matmul(
    x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None, activation: str, store_pre_activation: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    y, pre = _ss_kernels().ss_matmul(x, values, metadata, bias=bias, activation=activation, store_pre_activation=store_pre_activation)
    return y, pre if pre is not None else x.new_empty(0)


@_semi_structured_matmul.register_fake
def _(x, values, metadata, bias, activation, store_pre_activation):
    shape = (x.shape[0], values.shape[0])
    return x.new_empty(shape), x.new_empty(shape if store_pre_activation else (0,))


@torch.library.custom_op("lotus_kernels::semi_structured_matmul_dx", mutates_args=())
def _semi_structured_matmul_dx(grad: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, in_features: int) -> torch.Tensor:
    return _ss_kernels().ss_matmul_dx(grad, values, metadata, in_features)


@_semi_structured_matmul_dx.register_fake
def _(grad, values, metadata, in_features):
    return grad.new_empty((grad.shape[0], in_features))


def _semi_structured_setup(ctx, inputs, output):
    x, values, metadata, bias, activation, _ = inputs
    ctx.save_for_backward(x, values, metadata, output[1])
    ctx.activation, ctx.has_bias = activation, bias is not None


def _semi_structured_backward(ctx, grad_y, grad_pre):
    x, values, metadata, pre = ctx.saved_tensors
    grad = grad_before_activation("semi_structured_matmul", ctx.activation, grad_y, pre)
    n, half = values.shape
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _semi_structured_matmul_dx(grad, values, metadata, x.shape[1])
    if ctx.needs_input_grad[1]:
        grad_values = semi_structured_values_grad(grad, x, metadata)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return grad_x, grad_values, None, grad_bias, None, None


def semi_structured_values_grad(grad: torch.Tensor, x: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
    """Gradient of the compressed 2:4 values: grad [M, N], x [M, K] -> [N, K/2].

    dW dense (one cuBLAS matmul), then only the kept slots are read out:
    pruned positions never get gradient. Shared by every 2:4 backend.
    """
    n, k = grad.shape[1], x.shape[1]
    dense = (grad.t() @ x).view(n, k // 4, 4)
    return dense.gather(-1, unpack_2to4_slots(metadata, k)).reshape(n, k // 2)


_semi_structured_matmul.register_autograd(_semi_structured_backward, setup_context=_semi_structured_setup)


def semi_structured_matmul(
    x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """act(x @ W^T + bias) with W [N, K] as compress_2to4's (values [N, K/2], metadata) (Triton, forward and backward).

    x [..., K] (fp16, bf16 or fp32, any strides), bias [N] or None,
    activation "none" | "gelu" -> [..., N]. Gradients flow to x, the kept
    values only, and bias.
    metadata must code two ascending slots per group (what compress_2to4
    writes): checked on the first call with each metadata tensor and again
    after it changes in place (ValueError naming the first bad group; one
    host sync), trusted under torch.compile.
    """
    for t, name in ((x, "x"), (values, "values"), (metadata, "metadata")):
        check_tensor(t, name)
    if activation not in ACTIVATIONS:
        raise ValueError(f"semi_structured_matmul: activation must be 'none' or 'gelu', got {activation!r}")
    if x.dtype not in SEMI_STRUCTURED_DTYPES or values.dtype != x.dtype:
        raise TypeError(f"semi_structured_matmul: x and values must share a dtype in {SEMI_STRUCTURED_DTYPES}, got {x.dtype} and {values.dtype}")
    if metadata.dtype != torch.int32:
        raise TypeError(f"semi_structured_matmul: metadata must be int32, got {metadata.dtype}")
    k = x.shape[-1] if x.dim() else None
    n = values.shape[0] if values.dim() == 2 else None
    if k is None or k % 4 or values.dim() != 2 or values.shape[1] * 2 != k:
        raise ValueError(f"semi_structured_matmul: x [..., K] with K % 4 == 0 needs values [N, K/2]; got x {tuple(x.shape)}, values {tuple(values.shape)}")
    if metadata.shape != (n, -(-(k // 4) // GROUPS_PER_META_WORD)):
        raise ValueError(f"semi_structured_matmul: metadata must be [{n}, {-(-(k // 4) // GROUPS_PER_META_WORD)}], got {tuple(metadata.shape)}")
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.shape != (n,) or bias.dtype != x.dtype:
            raise ValueError(f"semi_structured_matmul: bias must be [{n}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_on_device_of_x("semi_structured_matmul", x, {"values": values, "metadata": metadata, "bias": bias})
    if not torch.compiler.is_compiling():
        # A code with i0 >= i1 would place two values in one slot (y silently wrong). Checked
        # once per metadata state, as the block structure is (ops.block_sparse_matmul, "Validation").
        _check_metadata_once(metadata, k)
    lead = x.shape[:-1]
    store_pre = activation == "gelu" and torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))
    y, _ = _semi_structured_matmul(x.reshape(-1, k), values, metadata, bias, activation, store_pre)
    return y.reshape(*lead, n)


def _check_metadata_once(metadata: torch.Tensor, in_features: int) -> None:
    def check() -> torch.Tensor:
        check_2to4_metadata(metadata, in_features, op="semi_structured_matmul")
        return CHECKED

    weight_cache.derived(f"checked-2:4-metadata-{in_features}", metadata, (), check)
