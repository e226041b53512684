"""What every op family shares: argument checks, the extension's op table, the GELU backward.

The op functions accept user input, so each checks types, shapes, dtypes and
devices before a kernel sees a pointer; these helpers word the errors alike.
"""

from __future__ import annotations

import math

import torch

# What weight_cache remembers for a check that passed: nothing but the fact.
CHECKED = torch.empty(0)


def extension_op(name: str):
    """``torch.ops.lotus_kernels.<name>``: an op of the compiled extension (looked up when called)."""
    return getattr(torch.ops.lotus_kernels, name)


def check_tensor(t, name: str) -> torch.Tensor:
    """t itself, or TypeError naming the argument when it is not a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_on_device_of_x(op: str, x: torch.Tensor, tensors: dict[str, torch.Tensor | None]) -> None:
    """ValueError naming the first tensor (None skipped) that is not on x's device.

    The kernels take raw pointers: a CPU index tensor handed to a CUDA launch
    fails far from its cause, or not at all under the interpreter.
    """
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; every tensor must be on x's device")


def grad_before_activation(op: str, activation: str, grad_y: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. the pre-activation (x @ W^T + b), contiguous, for the kernels' backward."""
    if activation == "gelu":
        if pre.numel() == 0:
            raise RuntimeError(f"{op}: GELU backward needs the pre-activation (store_pre_activation=True)")
        # d gelu(z)/dz for the exact GELU, in fp32.
        z = pre.float()
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        grad_y = (grad_y.float() * (cdf + z * pdf)).to(grad_y.dtype)
    return grad_y.contiguous()
