"""Image data for training ViTs on 32x32 images.

- ``image_set``: ``ImageSet`` (uint8 images [N, H, W, 3], int64 labels [N],
  class names, mean/std) and ``split_holdout``;
- ``sources``: CIFAR-10 from local pickles, an image folder or an archive
  (``resolve_cifar10_source``, ``load_cifar10``; decoded once, then cached);
- ``synthetic``: ``synthetic_dataset``, ten procedural shape classes, no files;
- ``loader``: ``DeviceLoader``, batches normalised and augmented (crop + flip)
  as tensor ops on the set's device, seeded by (seed, epoch); ``BatchDraws``.
"""

from .image_set import ImageSet, split_holdout
from .loader import BatchDraws, DeviceLoader, EpochPlan, crop_flip, normalize
from .sources import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar10, resolve_cifar10_source
from .synthetic import SYNTHETIC_CLASSES, synthetic_dataset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "SYNTHETIC_CLASSES",
    "ImageSet",
    "load_cifar10",
    "resolve_cifar10_source",
    "synthetic_dataset",
    "split_holdout",
    "normalize",
    "crop_flip",
    "EpochPlan",
    "BatchDraws",
    "DeviceLoader",
]
