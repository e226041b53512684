"""Mixup / CutMix of a batch with soft targets (``mix_batch``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.image_set import describe


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch's Beta/Gamma samplers take no generator: draw a numpy seed from
    # the torch generator so everything still follows from that one stream.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix of a batch with a permutation of itself, with soft targets.

    x: float [B, C, H, W] on any device; y: int64 [B] on x's device.
    With both alphas > 0, CutMix or Mixup is picked with probability 1/2
    (timm's default); with one, that one; with neither, x is returned as is.
    lam ~ Beta(alpha, alpha); Mixup: lam * x + (1 - lam) * x[perm]; CutMix:
    a box of area ~(1 - lam) of x[perm] pasted into x, lam then corrected to
    the exact kept area. Targets: lam * t(y) + (1 - lam) * t(y[perm]) with
    t the one-hot label smoothed by ``label_smoothing`` (each row sums to 1).
    generator: a CPU torch.Generator deciding the mode, lam, box and the
    seed of the permutation (a fresh unseeded one if None). The permutation is
    drawn on x's device and the mixing runs there: nothing waits for the
    device (no host-to-device copy per batch).

    Returns (x_mixed same shape/dtype/device as x, targets float32 [B, num_classes], lam).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise TypeError(f"x must be a float tensor [B, C, H, W], got {describe(x)}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise TypeError(f"y must be an int64 tensor [B] = [{x.shape[0]}], got {describe(y)}")
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {alpha!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    if generator is None:
        generator = torch.Generator()
    B, _, H, W = x.shape
    off = label_smoothing / num_classes
    targets = torch.full((B, num_classes), off, dtype=torch.float32, device=x.device)
    targets.scatter_(1, y.view(B, 1), 1.0 - label_smoothing + off)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, targets, 1.0
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand((), generator=generator) < 0.5))
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    device_generator = torch.Generator(device=x.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    perm = torch.randperm(B, generator=device_generator, device=x.device)
    if use_cutmix:
        # timm's rand_bbox: a box of side sqrt(1 - lam) times the image's, centre uniform, clipped at the border.
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=generator))
        cy, cx = cy % H, cx % W
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        mixed = x * lam + x[perm] * (1.0 - lam)
    targets = targets * lam + targets[perm] * (1.0 - lam)
    return mixed, targets, lam
