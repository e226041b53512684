"""``synthetic_dataset``: a procedural 32x32 image set that needs no files: ten
shape classes, bit-identical for the same (n, seed, split) and torch version.
"""

from __future__ import annotations

import functools
import math

import torch

from ..checks import check_int
from .image_set import IMAGE_SIZE, ImageSet, check_split, seeded_generator

SYNTHETIC_CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "gradient_blob",
)

# ---------------------------------------------------------------------------
# the synthetic set
# ---------------------------------------------------------------------------

_SYNTHETIC_BLOCK = 1000  # images generated per seeded block; a multiple of the 10 classes


def synthetic_dataset(n: int, seed: int = 0, split: str = "train") -> ImageSet:
    """``n`` procedurally drawn 32x32 RGB images in 10 balanced shape classes.

    Classes (SYNTHETIC_CLASSES): disc, square, triangle, ring, cross,
    horizontal / vertical / diagonal stripes, checkerboard, gradient blob.
    Shapes and the patches carrying the stripes and checks have random
    position, size and (for disc..cross) rotation; foreground and background
    colours are random, and a smooth random texture plus pixel noise lie on top.

    Deterministic: bit-identical for the same (n, seed, split) and torch
    version; train and test come from different seeds. Images are made in
    blocks of 1,000, each with its own seed: the first 1000*k images are the
    same for every n >= 1000*k, and every full block holds 100 of each class
    (a last partial block is balanced to within one image per class).

    Returns an ImageSet named "synthetic" on the CPU: images uint8
    [n, 32, 32, 3], labels int64 [n]. Its mean/std are those of the
    generator (measured once on a fixed reference sample), the same for every
    seed and split so train and test normalise alike.
    """
    check_int(n, "n", minimum=1)
    check_int(seed, "seed")
    split = check_split(split)
    images, labels = _synthetic_arrays(n, seed, split)
    mean, std = _synthetic_stats()
    return ImageSet(images, labels, SYNTHETIC_CLASSES, "synthetic", mean, std, source=f"synthetic(seed={seed}, split={split!r})")


@functools.lru_cache(maxsize=1)
def _synthetic_stats():
    images, labels = _synthetic_arrays(2 * _SYNTHETIC_BLOCK, 0, "reference")
    return ImageSet(images, labels, SYNTHETIC_CLASSES, "synthetic", (0, 0, 0), (1, 1, 1)).channel_stats()


def _synthetic_arrays(n: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for block, start in enumerate(range(0, n, _SYNTHETIC_BLOCK)):
        g = seeded_generator("synthetic", seed, split, block)
        x, y = _synthetic_block(min(_SYNTHETIC_BLOCK, n - start), g)
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def _frac(x: torch.Tensor) -> torch.Tensor:
    return x - torch.floor(x)


def _synthetic_block(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Only +, -, *, /, sqrt, floor and comparisons, each its own kernel: all
    # exactly rounded, so the pixels do not depend on the CPU's vector units
    # (no sin/exp, no randn, no interpolate kernels that may fuse into FMAs).
    S = IMAGE_SIZE
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand((n, *shape), generator=g)

    # Every parameter is drawn for every image, in a fixed order, whatever its class.
    cx, cy = uniform(10.0, 22.0, 1, 1), uniform(10.0, 22.0, 1, 1)
    size = uniform(5.0, 9.0, 1, 1)
    direction = uniform(-1.0, 1.0, 2, 1, 1)
    period = uniform(3.0, 6.0, 1, 1)
    phase = uniform(0.0, 1.0, 2, 1, 1)
    coin = torch.rand((n, 2, 1, 1), generator=g) < 0.5  # window shape, diagonal direction
    background = uniform(0.0, 1.0, 1, 1, 3)
    foreground = _frac(background + uniform(0.3, 0.7, 1, 1, 3))  # each channel >= 0.3 away (mod 1)
    texture_amp = uniform(0.04, 0.2, 1, 1, 1)
    coarse = uniform(-1.0, 1.0, 5, 5, 3)
    noise_amp = uniform(0.0, 0.08, 1, 1, 1)
    noise = uniform(-1.0, 1.0, S, S, 3)

    norm = torch.sqrt(direction[:, 0] * direction[:, 0] + direction[:, 1] * direction[:, 1]).clamp_min(1e-3)
    cos, sin = direction[:, 0] / norm, direction[:, 1] / norm
    centres = torch.arange(S, dtype=torch.float32) + 0.5
    xs, ys = centres.view(1, 1, S), centres.view(1, S, 1)
    dx, dy = xs - cx, ys - cy  # [n, S, S]
    u, v = dx * cos + dy * sin, dy * cos - dx * sin  # rotated frame
    r2 = dx * dx + dy * dy
    s = size
    window = torch.where(coin[:, 0], torch.maximum(dx.abs(), dy.abs()) < 1.1 * s, r2 < (1.25 * s) ** 2)

    def stripes(coordinate):
        return _frac(coordinate / period + phase[:, 0]) < 0.5

    diagonal = torch.where(coin[:, 1], xs + ys, xs - ys) / math.sqrt(2.0)
    cell = 0.75 * period
    checks = (torch.floor(xs / cell + phase[:, 0]) + torch.floor(ys / cell + phase[:, 1])) % 2 == 0
    shapes = [
        lambda: r2 < s * s,  # disc
        lambda: torch.maximum(u.abs(), v.abs()) < 0.85 * s,  # square
        lambda: (v <= 0.5 * s) & (u.abs() <= (v + s) * 0.577),  # triangle, apex at v = -s
        lambda: (r2 < s * s) & (r2 > (0.55 * s) ** 2),  # ring
        lambda: ((u.abs() < 0.3 * s) & (v.abs() < s)) | ((v.abs() < 0.3 * s) & (u.abs() < s)),  # cross
        lambda: window & stripes(ys),
        lambda: window & stripes(xs),
        lambda: window & stripes(diagonal),
        lambda: window & checks,
        lambda: (1.0 - r2 / (2.56 * s * s)).clamp_min(0.0) ** 2,  # gradient blob, radius 1.6 s
    ]
    # Each class's mask is evaluated for all n images (cheap at 1,000) and kept where the label matches.
    alpha = torch.zeros(n, S, S)
    for k, shape in enumerate(shapes):
        alpha = torch.where((labels == k).view(n, 1, 1), shape().float(), alpha)

    texture = _upsample_bilinear(coarse, S) * texture_amp
    image = background + (foreground - background) * alpha.unsqueeze(-1) + texture + noise * noise_amp
    pixels = torch.floor(image.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return pixels, labels


def _upsample_bilinear(coarse: torch.Tensor, size: int) -> torch.Tensor:
    """[n, k, k, C] -> [n, size, size, C], corners aligned, from separate exactly rounded ops."""
    k = coarse.shape[1]
    pos = torch.arange(size, dtype=torch.float32) * ((k - 1) / (size - 1))
    low = torch.floor(pos).long().clamp(max=k - 2)
    w = (pos - low.float()).view(1, size, 1, 1)
    rows = coarse[:, low] * (1.0 - w) + coarse[:, low + 1] * w  # [n, size, k, C]
    w = w.view(1, 1, size, 1)
    return rows[:, :, low] * (1.0 - w) + rows[:, :, low + 1] * w
