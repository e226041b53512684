"""What the Triton kernel files share: the interpreter switch, the epilogues, the dot precision."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when it is imported; so do we.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVATIONS = ("none", "gelu")


@triton.jit
def gelu(z):
    # Exact (erf) GELU, as torch.nn.GELU() and timm's Mlp use by default.
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


def input_precision(dtype: torch.dtype) -> str:
    """How fp32 dots run: as torch's own fp32 matmuls do, so that switching a layer between the
    dense and a Triton backend never changes its precision silently.

    ``torch.set_float32_matmul_precision("high")`` (or "medium") allows TF32
    tensor cores; the default "highest" keeps full fp32 ("ieee"). The
    interpreter (numpy) is always exact. fp16/bf16 dots ignore the setting.
    """
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs; the value every AOT-compile test builds with
    if INTERPRET:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def packed(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor contiguous (itself when it already is; None stays None).

    The kernels address x, dy and their outputs through strides but read
    weights, metadata, bias and index tensors as packed row-major arrays; a
    strided view of one of those (values.t().contiguous().t(), bias[::2])
    would be read as if it were packed: a silent wrong answer.
    """
    return tuple(None if t is None else t.contiguous() for t in tensors)
