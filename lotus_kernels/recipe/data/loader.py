"""Batches of a whole ``ImageSet`` kept on one device: ``DeviceLoader`` yields
normalised float batches, with random crop (zero padding) and horizontal flip
done as tensor ops on that device, so CPU tests run the code used on GPU. Its
sample order and augmentation come from CPU generators seeded by (seed,
epoch): the same on every device and every run, and shardable across
data-parallel ranks. ``BatchDraws`` says which samples a batch holds and how
they were augmented (what fixed tickets follow through the augmentation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from ..checks import check_int
from .image_set import ImageSet, check_triple, describe, seeded_generator

# ---------------------------------------------------------------------------
# batching and augmentation
# ---------------------------------------------------------------------------


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] = (images / 255 - mean) / std, per channel.

    mean, std: 3 floats, or float32 tensors broadcastable to [1, 3, 1, 1] on images' device.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise TypeError(f"images must be a uint8 tensor [B, H, W, 3], got {describe(images)}")
    if not isinstance(mean, torch.Tensor):
        mean = torch.tensor(check_triple(mean, "mean"), device=images.device).view(1, 3, 1, 1)
    if not isinstance(std, torch.Tensor):
        std = torch.tensor(check_triple(std, "std", positive=True), device=images.device).view(1, 3, 1, 1)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return ((x - mean) / std).contiguous()


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip for a whole batch at once.

    images: uint8 [B, H, W, C]. Each image is padded with ``padding`` zeros on
    every side, the H x W window whose top-left corner is offsets[b] = (dy, dx)
    (each in [0, 2 * padding]; (padding, padding) is the image itself) is cut
    out, and mirrored left-right where flips[b] is True.
    offsets: int64 [B, 2]; flips: bool [B]; both on images' device. Offsets
    are not range-checked (that would cost a device sync per batch).
    Returns uint8 [B, H, W, C].
    """
    if images.dim() != 4:
        raise ValueError(f"images must be shaped [B, H, W, C], got {list(images.shape)}")
    B, H, W, C = images.shape
    if offsets.shape != (B, 2) or flips.shape != (B,):
        raise ValueError(f"offsets must be [{B}, 2] and flips [{B}], got {list(offsets.shape)} and {list(flips.shape)}")
    padded = images.new_zeros(B, H + 2 * padding, W + 2 * padding, C)
    padded[:, padding : padding + H, padding : padding + W] = images
    rows = offsets[:, :1] + torch.arange(H, device=images.device)  # [B, H]
    cols = torch.arange(W, device=images.device)
    # A flip is a reversed column order: fold it into the gather instead of a second pass.
    cols = offsets[:, 1:] + torch.where(flips.view(B, 1), W - 1 - cols, cols)  # [B, W]
    batch = torch.arange(B, device=images.device).view(B, 1, 1)
    return padded[batch, rows.view(B, H, 1), cols.view(B, 1, W)]


@dataclasses.dataclass(frozen=True, eq=False)
class EpochPlan:
    """What one rank sees in one epoch, on the CPU.

    indices: int64 [M], dataset positions in the order they are batched.
    offsets: int64 [M, 2], crop offsets (dy, dx) into the padded image, for crop_flip.
    flips: bool [M], horizontal flips.
    Without augmentation, offsets are all (padding, padding) and flips all False.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    flips: torch.Tensor


@dataclasses.dataclass(frozen=True)
class BatchDraws:
    """Which samples a batch holds and how they were augmented, on the loader's device.

    indices: int64 [B] dataset positions; offsets: int64 [B, 2] crop offsets
    (dy, dx) into the image padded by ``padding`` pixels; flips: bool [B].
    What ``map_tickets`` / ``map_scores`` need to follow patches through the
    augmentation.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    flips: torch.Tensor
    padding: int


class DeviceLoader:
    """Mini-batches of a whole ImageSet kept on one device.

    Iterating yields ``(x, y)``: x float32 [B, 3, H, W] normalised with the
    dataset's mean/std (or the ones given), y int64 [B], both on ``device``.

    Order: with ``shuffle``, a permutation drawn from a CPU generator seeded
    by (seed, epoch); otherwise dataset order. ``set_epoch`` chooses the epoch
    (and the batch to start from, to resume a run mid-epoch); the loader never
    advances it itself, so call it before each epoch as with DistributedSampler.

    Augmentation (``augment=True``): a random crop from the image padded with
    ``padding`` zero pixels, and a horizontal flip with probability 1/2, drawn
    per dataset sample from a generator seeded by (seed, epoch) and applied as
    batched tensor ops (``crop_flip``). A sample's augmentation in an epoch
    depends on neither batch size, rank nor world size. ``plan()`` returns
    the order and the augmentation draws.

    Sharding for data parallelism (``rank`` of ``world_size``; give every
    rank the same seed): every rank draws the same epoch permutation and
    takes every world_size-th sample from position ``rank``, so shards are
    disjoint and equal in size. With
    ``drop_last=False`` the permutation is first padded by repeating its
    start until its length divides by world_size (a few samples are seen
    twice per epoch, as in DistributedSampler), and a last short batch is
    kept. With ``drop_last=True`` the permutation's tail is dropped instead
    (at most world_size - 1 samples, different ones each epoch) and so is
    a last short batch.
    """

    def __init__(
        self,
        dataset: ImageSet,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,
        padding: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device=None,
        mean=None,
        std=None,
    ):
        if not isinstance(dataset, ImageSet):
            raise TypeError(f"dataset must be an ImageSet, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        for flag, name in ((shuffle, "shuffle"), (drop_last, "drop_last"), (augment, "augment")):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.padding = check_int(padding, "padding", minimum=0)
        self.seed = check_int(seed, "seed")
        self.world_size = check_int(world_size, "world_size", minimum=1)
        self.rank = check_int(rank, "rank", minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")

        self.dataset = dataset.to(device) if device is not None else dataset
        self.device = self.dataset.device
        mean = check_triple(dataset.mean if mean is None else mean, "mean")
        std = check_triple(dataset.std if std is None else std, "std", positive=True)
        self.mean, self.std = mean, std
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.epoch = 0
        self.start_batch = 0
        if len(self) == 0:
            raise ValueError(
                f"no batches: {self.num_samples} samples per rank with batch_size={batch_size} and drop_last=True"
            )

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n, w = len(self.dataset), self.world_size
        return n // w if self.drop_last else -(-n // w)

    def __len__(self) -> int:
        """Batches per epoch (iteration yields len(self) - start_batch of them)."""
        m = self.num_samples
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate over ``epoch`` from then on, starting at batch ``start_batch`` (to resume a run)."""
        self.epoch = check_int(epoch, "epoch", minimum=0)
        check_int(start_batch, "start_batch", minimum=0)
        if start_batch > len(self):
            raise ValueError(f"start_batch must be <= {len(self)} batches per epoch, got {start_batch}")
        self.start_batch = start_batch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's order and augmentation draws for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else check_int(epoch, "epoch", minimum=0)
        n, w = len(self.dataset), self.world_size
        if self.shuffle:
            order = torch.randperm(n, generator=seeded_generator("order", self.seed, epoch))
        else:
            order = torch.arange(n)
        total = self.num_samples * w
        # total <= n drops the tail; total > n repeats the start (n may even be < w).
        order = order.repeat(-(-total // n))[:total]
        indices = order[self.rank :: w]
        if self.augment:
            g = seeded_generator("augment", self.seed, epoch)
            offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)[indices]
            flips = torch.randint(0, 2, (n,), generator=g).bool()[indices]
        else:
            offsets = torch.full((len(indices), 2), self.padding, dtype=torch.int64)
            flips = torch.zeros(len(indices), dtype=torch.bool)
        return EpochPlan(indices, offsets, flips)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _ in self.iter_with_draws():
            yield x, y

    def iter_with_draws(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, BatchDraws]]:
        """As iterating, plus each batch's ``BatchDraws`` (for fixed data lottery tickets)."""
        plan = self.plan()
        indices = plan.indices.to(self.device)
        offsets, flips = plan.offsets.to(self.device), plan.flips.to(self.device)
        m, b = len(indices), self.batch_size
        for i in range(self.start_batch, len(self)):
            batch = slice(i * b, min((i + 1) * b, m))
            index = indices[batch]
            images = self.dataset.images[index]
            if self.augment:
                images = crop_flip(images, offsets[batch], flips[batch], self.padding)
            draws = BatchDraws(index, offsets[batch], flips[batch], self.padding)
            yield normalize(images, self._mean, self._std), self.dataset.labels[index], draws

    def __repr__(self) -> str:
        return (
            f"DeviceLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, augment={self.augment}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size}, epoch={self.epoch})"
        )
