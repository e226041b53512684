"""``ImageSet``, the one container every dataset of the recipe is: the decoded
pixels as one uint8 tensor ``images [N, H, W, 3]`` (HWC, as decoded; 32x32
from both loaders) with ``labels`` int64 ``[N]``, the class names and the
mean/std to normalise with; ``split_holdout`` carves a validation set out of
one.

The argument checks and the seeded CPU generator here are shared by the data
package's other modules (sources, synthetic, loader).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..checks import check_int
from ..seeding import derive_seed

SPLITS = ("train", "test")
IMAGE_SIZE = 32


# ---------------------------------------------------------------------------
# argument checks (shared by the data modules)
# ---------------------------------------------------------------------------


def check_split(split) -> str:
    """``split`` if it is one of SPLITS; else TypeError / ValueError."""
    if not isinstance(split, str):
        raise TypeError(f"split must be one of {SPLITS}, got {type(split).__name__} {split!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_triple(value, name: str, positive: bool = False) -> tuple[float, float, float]:
    """3 finite floats (one per RGB channel), > 0 with ``positive``; else TypeError / ValueError naming ``name``."""
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be 3 floats (one per RGB channel), got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{name} must be 3 finite floats (one per RGB channel), got {value!r}")
    if positive and min(triple) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return triple


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded by ``derive_seed(*parts)``."""
    # CPU generators: their streams are the same on every machine, unlike a
    # CUDA generator's, so a run's batches do not depend on the device.
    return torch.Generator().manual_seed(derive_seed(*parts))


def describe(value) -> str:
    """A short description of a bad argument for an error message: a tensor's dtype and shape, else its type and repr."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


# ---------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image set held as whole tensors.

    images: uint8 [N, H, W, 3], HWC as decoded (32x32 from this module's loaders).
    labels: int64 [N], each in [0, len(classes)), on the same device as images.
    classes: class names, label i naming classes[i].
    name: what the data is ("cifar10", "synthetic"); report results under it.
    mean, std: per-channel statistics (pixels scaled to [0, 1]) to normalise with.
    source: where the data came from, for logs.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 tensor, got {describe(images)}")
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be shaped [N, H, W, 3], got {list(images.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 tensor, got {describe(labels)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be shaped [N] = [{images.shape[0]}], got {list(labels.shape)}")
        if labels.device != images.device:
            raise ValueError(f"labels are on {labels.device} but images on {images.device}")
        if isinstance(self.classes, str) or not all(isinstance(c, str) for c in self.classes):
            raise TypeError(f"classes must be a sequence of class-name strings, got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.classes:
            raise ValueError("classes must name at least one class")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__} {self.name!r}")
        if not self.name:
            raise ValueError("name must not be empty")
        object.__setattr__(self, "mean", check_triple(self.mean, "mean"))
        object.__setattr__(self, "std", check_triple(self.std, "std", positive=True))
        if labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= len(self.classes):
                raise ValueError(f"labels must lie in [0, {len(self.classes)}), got values in [{low}, {high}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape[1:])
        return f"ImageSet(name={self.name!r}, n={len(self)}, image={shape}, classes={len(self.classes)}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> ImageSet:
        """The same set with images and labels on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def subset(self, index) -> ImageSet:
        """The samples selected by ``index``: a slice, an int64 tensor / sequence of positions, or a bool mask [N]."""
        if isinstance(index, slice):
            return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])
        index = torch.as_tensor(index, device=self.device)
        if index.dtype not in (torch.int64, torch.int32, torch.bool) or index.dim() != 1:
            raise TypeError(f"index must be a slice, a 1-D integer sequence or a bool mask, got {describe(index)}")
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])

    def channel_stats(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """This set's own per-channel (mean, std), pixels scaled to [0, 1]."""
        # From 256-bin histograms: exact, and no float copy of the whole set.
        values = torch.arange(256, dtype=torch.float64) / 255
        means, stds = [], []
        for c in range(3):
            counts = torch.bincount(self.images[..., c].reshape(-1), minlength=256).cpu().double()
            total = counts.sum()
            mean = (counts * values).sum() / total
            var = (counts * (values - mean) ** 2).sum() / total
            means.append(float(mean))
            stds.append(float(var.sqrt()))
        return tuple(means), tuple(stds)



def split_holdout(dataset: ImageSet, n_holdout: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Split ``dataset`` into (rest, holdout) with ``n_holdout`` samples drawn at random.

    The draw depends only on (len(dataset), seed, n_holdout); both parts keep
    the dataset's order. Use it to carve a validation set from a training
    split whose order is grouped by class.
    """
    if not isinstance(dataset, ImageSet):
        raise TypeError(f"dataset must be an ImageSet, got {type(dataset).__name__}")
    check_int(n_holdout, "n_holdout", minimum=0)
    check_int(seed, "seed")
    if n_holdout > len(dataset):
        raise ValueError(f"n_holdout must be <= len(dataset) = {len(dataset)}, got {n_holdout}")
    perm = torch.randperm(len(dataset), generator=seeded_generator(seed, "holdout"))
    holdout = torch.sort(perm[:n_holdout]).values
    rest = torch.sort(perm[n_holdout:]).values
    return dataset.subset(rest.to(dataset.device)), dataset.subset(holdout.to(dataset.device))
