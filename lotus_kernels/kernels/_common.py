"""What the Triton kernel files share: the interpreter switch, the autotuning policy, the epilogues, the dot precision."""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# INTERPRET: Triton reads TRITON_INTERPRET when it is imported; so do we (once, in _shared).
# bucket: autotuning keys by shape class (a power of two), so that a batch size, a keep
# ratio or a pruning level that moves a size a little reuses the tuned config;
# the same classes "auto" decides by.
from .._shared import ACTIVATIONS, INTERPRET  # noqa: F401  (re-exported for the kernel files)
from .._shared import rows_bucket as bucket  # noqa: F401

# How hard the kernels autotune, read once at import like TRITON_INTERPRET:
#   "full" (default): every config of a kernel, for the best speed;
#   "quick": a few configs per kernel (lotus gpu-check: a 15-minute lease
#            cannot spend 10-25 s per kernel variant compiling configs);
#   "off": one config, compiled once, never timed (the CUDA test suite:
#          correctness does not depend on the tile): each kernel's smallest
#          tile, which fits every arch's shared memory at every dtype and head
#          size, and compiles fastest (fp32 "ieee" dots become FMA loops whose
#          compile time grows with the tile: a cold sm_90 compile of the
#          attention kernels takes 2.0-2.5 s at the smallest tile and 5.6-10 s
#          at the largest, bench/results/aot-compile-times-sm90-cpu-2026-12-01.json).
AUTOTUNE_MODES = ("full", "quick", "off")
AUTOTUNE = os.environ.get("LOTUS_AUTOTUNE", "full")
if AUTOTUNE not in AUTOTUNE_MODES:
    raise ValueError(f"LOTUS_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {AUTOTUNE!r}")
# Triton >= 3.2 can keep autotuning results in its on-disk cache, so a second
# process (the next gpu-check step, the next test worker) does not time again.
_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def autotune_configs(configs: list, quick: tuple[int, ...], off: int) -> list:
    """The configs to autotune over under LOTUS_AUTOTUNE: all, the ``quick`` subset (indices into
    ``configs``), or ``configs[off]`` alone."""
    if AUTOTUNE == "full":
        return list(configs)
    return [configs[i] for i in quick] if AUTOTUNE == "quick" else [configs[off]]


def autotune(kernel, configs: list, key: list[str], quick: tuple[int, ...], off: int):
    """``triton.autotune`` over ``autotune_configs(configs, quick, off)``, results cached on disk where Triton can."""
    extra = {"cache_results": True} if _CACHE_RESULTS else {}
    return triton.autotune(autotune_configs(configs, quick, off), key=key, **extra)(kernel)


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
