"""Constants and tiny helpers that several layers of the library share, each defined once.

Environment switches are read here, once, at import: triton reads
TRITON_INTERPRET at its own import, so a value changed later would leave our
checks and its kernels disagreeing.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Triton's interpreter: kernels run on CPU tensors (tests); set before importing lotus_kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Whether triton can be imported, looked up once without importing it: a per-call find_spec
# breaks torch.compile on older torch (dynamo refuses to trace importlib).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# Epilogues the matmul kernels fuse (exact erf GELU): SparseLinear, the ops and the kernels.
ACTIVATIONS = ("none", "gelu")

# What the Triton kernels compute in (accumulating in fp32).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rows_bucket(rows: int) -> int:
    """Rows of x rounded up to a power of two: the shape class of per-shape decisions
    (auto's backend choice, cuSPARSELt's algorithm search, Triton's autotuning keys)."""
    return 1 << (max(1, rows) - 1).bit_length()
