"""The optimiser and its schedule: AdamW parameter groups (weight decay on matrices only),
the warmup + cosine learning rate, and the AdamW ``train`` builds (fused where it can be)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .devices import resolve_compile
from .train_config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: [{"params": decayed, ...}, {"params": not decayed, "weight_decay": 0}].

    Decayed: matrices and conv kernels (ndim >= 2), and every SparseLinear's
    compact ``values`` (whatever its ndim: it *is* a weight matrix, stored
    flat for the unstructured pattern). Not decayed: biases, norm scales and
    shifts, and what the model lists in ``no_weight_decay()`` (timm ViT:
    pos_embed, cls_token), the usual ViT recipe.
    """
    from lotus_kernels.nn import SparseLinear

    skip: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    sparse_values = {id(m.values) for m in model.modules() if isinstance(m, SparseLinear)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        elif id(p) in sparse_values or p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at_step(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Linear warmup lr * (step + 1) / warmup_steps for the first warmup_steps
    steps (so the first step is not wasted at lr 0), then cosine from lr at
    step warmup_steps down to min_lr at step total_steps - 1 (with fewer than
    two steps after warmup, lr).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return lr  # a single post-warmup step has nothing to anneal towards: spend it at the peak
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def adamw(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (betas 0.9, 0.999), fused (one kernel for all parameters) on CUDA and
    on the compiled CPU path. The eager CPU path keeps the for-loop AdamW, so eager CPU runs stay bit
    for bit what they were before the fused kernel was used."""
    groups = param_groups(model, config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = device.type == "cuda" or resolve_compile(config.compile, device)
    fused = fused and all(p.is_floating_point() and p.device.type in _fused_adamw_devices() for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=fused)


def _fused_adamw_devices() -> tuple[str, ...]:
    """Device types with a fused AdamW kernel in this torch (CPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # an older torch: CUDA only
        return ("cuda",)
