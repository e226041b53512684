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
    """fp32 dots: TF32 tensor cores on GPU; exact in the interpreter (numpy), where TF32 means nothing."""
    return "ieee" if dtype == torch.float32 and INTERPRET else "tf32"
