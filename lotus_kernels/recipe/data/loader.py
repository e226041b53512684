"""Image data for training ViTs on 32x32 images: CIFAR-10 from local files, a
procedural synthetic set, and a loader that batches and augments on any device.

Datasets are ``ImageSet``s: the decoded pixels as one uint8 tensor
``images [N, H, W, 3]`` (HWC, as decoded; 32x32 from both loaders) with
``labels`` int64 ``[N]``, the class names and the mean/std to normalise with.

CIFAR-10 (``load_cifar10``) comes from any of:
- torchvision's pickle batches: a ``cifar-10-batches-py`` directory
  (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or its parent;
- an image folder: ``train/<class>/*.jpg|png`` and ``test/<class>/*.jpg|png``;
- a ``.tar`` / ``.tar.gz`` archive of either layout, read in place (a common
  leading folder inside the archive is fine);
- ``"download"``: torchvision downloads the pickles into ``cache_dir``.
Class folders named exactly like CIFAR-10's classes get CIFAR-10's label
order (airplane=0 ... truck=9); any other set of names is sorted. Samples are
ordered by split, then label, then file name: an image folder's train split
is grouped by class, so carve a validation set with ``split_holdout``, not
by slicing off the tail.

Decoding JPEG/PNG files (Pillow) and reading archives happens once per
source: the uint8 arrays of both splits go to ``<cache_dir>/cifar10-*.npz``,
keyed by the source's absolute path, size and mtime (every relevant file's,
for a directory). Pickle directories are not cached: they already hold
decoded arrays and load as fast as the cache would.

``synthetic_dataset`` needs no files: ten shape classes drawn procedurally,
bit-identical for the same (n, seed, split) and torch version.

``DeviceLoader`` keeps a whole set on one device and yields normalised float
batches, with random crop (zero padding) and horizontal flip done as tensor
ops on that device, so CPU tests run the code used on GPU. Its sample order
and augmentation come from CPU generators seeded by (seed, epoch): the same
on every device and every run, and shardable across data-parallel ranks.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import lzma
import math
import multiprocessing
import os
import pickle
import re
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

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

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std of the 50,000 CIFAR-10 training images, pixels in
# [0, 1]. (The often-copied std (0.2023, 0.1994, 0.2010) is not the pixel std.)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

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

SPLITS = ("train", "test")
IMAGE_SIZE = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ENV_SOURCE = "LOTUS_CIFAR10"
DEFAULT_SOURCE = Path("..") / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_CACHE_DIR = Path("~") / ".cache" / "lotus_kernels"

_PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_PICKLE_TEST = ("test_batch",)
_PICKLE_META = "batches.meta"
_PICKLE_FILES = (*_PICKLE_TRAIN, *_PICKLE_TEST, _PICKLE_META)
_PICKLE_DIR = "cifar-10-batches-py"
# Bump when the cache's content or layout changes: old files then miss.
_CACHE_VERSION = 1
# Below this many images a process pool costs more than it saves.
_POOL_MIN_IMAGES = 4096
_POOL_CHUNK = 2048


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _check_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _check_split(split) -> str:
    if not isinstance(split, str):
        raise TypeError(f"split must be one of {SPLITS}, got {type(split).__name__} {split!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _check_triple(value, name: str, positive: bool = False) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be 3 floats (one per RGB channel), got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{name} must be 3 finite floats (one per RGB channel), got {value!r}")
    if positive and min(triple) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return triple


def _derive_seed(*parts) -> int:
    """A 63-bit seed from any mix of ints and strings, stable across runs and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts) -> torch.Generator:
    # CPU generators: their streams are the same on every machine, unlike a
    # CUDA generator's, so a run's batches do not depend on the device.
    return torch.Generator().manual_seed(_derive_seed(*parts))


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
            raise TypeError(f"images must be a uint8 tensor, got {_describe(images)}")
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be shaped [N, H, W, 3], got {list(images.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 tensor, got {_describe(labels)}")
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
        object.__setattr__(self, "mean", _check_triple(self.mean, "mean"))
        object.__setattr__(self, "std", _check_triple(self.std, "std", positive=True))
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
            raise TypeError(f"index must be a slice, a 1-D integer sequence or a bool mask, got {_describe(index)}")
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


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def split_holdout(dataset: ImageSet, n_holdout: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Split ``dataset`` into (rest, holdout) with ``n_holdout`` samples drawn at random.

    The draw depends only on (len(dataset), seed, n_holdout); both parts keep
    the dataset's order. Use it to carve a validation set from a training
    split whose order is grouped by class.
    """
    if not isinstance(dataset, ImageSet):
        raise TypeError(f"dataset must be an ImageSet, got {type(dataset).__name__}")
    _check_int(n_holdout, "n_holdout", minimum=0)
    _check_int(seed, "seed")
    if n_holdout > len(dataset):
        raise ValueError(f"n_holdout must be <= len(dataset) = {len(dataset)}, got {n_holdout}")
    perm = torch.randperm(len(dataset), generator=_generator(seed, "holdout"))
    holdout = torch.sort(perm[:n_holdout]).values
    rest = torch.sort(perm[n_holdout:]).values
    return dataset.subset(rest.to(dataset.device)), dataset.subset(holdout.to(dataset.device))


# ---------------------------------------------------------------------------
# CIFAR-10: finding the source
# ---------------------------------------------------------------------------


def resolve_cifar10_source(path=None) -> str | None:
    """Where CIFAR-10 should come from: ``path`` if given, else $LOTUS_CIFAR10
    if set, else ``../shared/data/cifar10-jpeg.tar.gz`` (relative to the current
    directory) made absolute if it exists, else None.

    Only that last fallback is checked for existence; ``load_cifar10`` reports
    a missing path.
    """
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
        return os.fspath(path)
    env = os.environ.get(ENV_SOURCE, "").strip()
    if env:
        return env
    if DEFAULT_SOURCE.exists():
        return str(DEFAULT_SOURCE.resolve())
    return None


def load_cifar10(source=None, split: str = "train", cache_dir=None, *, num_workers: int | None = None) -> ImageSet:
    """CIFAR-10's ``split`` ("train" or "test") from ``source``.

    source: a pickle directory (or its parent), an image-folder directory, a
        .tar/.tar.gz archive of either (see the module docstring), or
        "download"; None means ``resolve_cifar10_source()``.
    cache_dir: where decoded arrays are cached (and "download" downloads to);
        default ~/.cache/lotus_kernels.
    num_workers: processes decoding images on a cache miss; default: the
        usable CPUs, at most 8.

    Returns an ImageSet named "cifar10" on the CPU: images uint8 [N, 32, 32, 3],
    labels int64 [N], normalised with CIFAR10_MEAN / CIFAR10_STD.

    Raises ValueError for a missing or unrecognised source, a corrupt or
    incomplete file (named in the message), a source without ``split``, and
    images that are not 32x32; RuntimeError when "download" fails.
    """
    split = _check_split(split)
    if num_workers is not None:
        _check_int(num_workers, "num_workers", minimum=1)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a str or os.PathLike, got {type(cache_dir).__name__} {cache_dir!r}")
    cache = Path(os.path.expanduser(os.fspath(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)))

    if source is None:
        source = resolve_cifar10_source()
        if source is None:
            raise ValueError(
                f"no CIFAR-10 source: pass a path, set ${ENV_SOURCE}, place {DEFAULT_SOURCE} "
                "relative to the current directory, or pass 'download'"
            )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path (str or os.PathLike) or 'download', got {type(source).__name__} {source!r}")
    if source == "download":
        path = _download_cifar10(split, cache)
    else:
        path = Path(os.path.expanduser(os.fspath(source))).absolute()
        if not path.exists():
            raise ValueError(f"CIFAR-10 source {str(path)!r} does not exist")

    kind, root = _detect_layout(path)
    if kind == "pickles":
        decoded = _read_pickle_dir(root, split)
    else:
        decoded = _cached_read(kind, root, split, cache, num_workers)

    if split not in decoded.splits:
        raise ValueError(f"{root} has no {split!r} split (found: {', '.join(decoded.available) or 'none'})")
    images, labels = decoded.splits[split]
    return ImageSet(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64, copy=False)),
        classes=decoded.classes,
        name="cifar10",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        source=f"{root} ({decoded.layout})",
    )


def _download_cifar10(split: str, cache: Path) -> Path:
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(cache), train=split == "train", download=True)
    # Offline machines fail in many ways (URLError, socket errors, an
    # incomplete file failing its checksum, no torchvision): all mean the same here.
    except Exception as exc:
        raise RuntimeError(
            f"could not download CIFAR-10 into {cache} ({type(exc).__name__}: {exc}); the machine may be "
            f"offline. Give a local path instead: load_cifar10('/path/to/cifar10-jpeg.tar.gz' or a "
            f"'{_PICKLE_DIR}' directory), or set ${ENV_SOURCE}"
        ) from exc
    return cache / _PICKLE_DIR


def _detect_layout(path: Path) -> tuple[str, Path]:
    """(kind, root): kind is "pickles", "folder" or "archive"."""
    if path.is_file():
        return "archive", path
    if not path.is_dir():
        raise ValueError(f"CIFAR-10 source {str(path)!r} is neither a file nor a directory")
    if any((path / name).is_file() for name in _PICKLE_FILES):
        return "pickles", path
    if (path / _PICKLE_DIR).is_dir():
        return "pickles", path / _PICKLE_DIR
    if any((path / split).is_dir() for split in SPLITS):
        return "folder", path
    raise ValueError(
        f"{path} is not a CIFAR-10 directory: expected torchvision's pickle batches ({_PICKLE_META}, "
        f"data_batch_1..5, test_batch), a {_PICKLE_DIR}/ folder, or train/<class>/ and test/<class>/ image folders"
    )


# ---------------------------------------------------------------------------
# CIFAR-10: reading
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Decoded:
    """A source's splits: split -> (uint8 [N, 32, 32, 3], int64 [N]).

    available: the splits the source has, read or not (default: those in splits).
    """

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: tuple[str, ...]
    layout: str
    available: tuple[str, ...] = ()

    def __post_init__(self):
        self.available = self.available or tuple(self.splits)


def _class_order(names) -> tuple[str, ...]:
    names = set(names)
    if names == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(sorted(names))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    A pickle can run arbitrary code when loaded, and the path may come from an
    environment variable: refuse every global that CIFAR-10's batches (written
    by Python 2 or 3, any protocol) do not need.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # latin1, as torchvision does: the original batches were written by Python 2.
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # truncated or foreign pickles fail with many exception types
        raise ValueError(f"{where}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Python 2 pickles give str keys under latin1, Python 3 ones bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_pickles(blobs: dict[str, bytes], where: str, layout: str) -> _Decoded:
    """blobs: file name -> content for the pickle files present; where names the directory or archive."""
    if _PICKLE_META not in blobs:
        raise ValueError(f"{where}: {_PICKLE_META} is missing (it names the classes)")
    meta = _unpickle(blobs[_PICKLE_META], f"{where}/{_PICKLE_META}")
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{where}/{_PICKLE_META}: no 'label_names' list")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    splits = {}
    for split, files in (("train", _PICKLE_TRAIN), ("test", _PICKLE_TEST)):
        present = [f for f in files if f in blobs]
        if not present:
            continue
        if len(present) != len(files):
            missing = sorted(set(files) - set(present))
            raise ValueError(f"{where}: incomplete {split} split, missing {', '.join(missing)}")
        images, labels = [], []
        for f in files:
            batch = _unpickle(blobs[f], f"{where}/{f}")
            data, lab = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{where}/{f}: 'data' must be a uint8 array [N, 3072], got {_describe_np(data)}")
            lab = np.asarray(lab, dtype=np.int64) if lab is not None else None
            if lab is None or lab.shape != (data.shape[0],):
                raise ValueError(f"{where}/{f}: 'labels' must hold {data.shape[0]} labels")
            if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
                raise ValueError(f"{where}/{f}: labels outside [0, {len(classes)})")
            # Rows are CHW planes (1024 red, 1024 green, 1024 blue); we keep HWC.
            images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
            labels.append(lab)
        splits[split] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    if not splits:
        raise ValueError(f"{where}: no data batches (data_batch_1..5 or test_batch)")
    return _Decoded(splits, classes, layout)


def _describe_np(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def _read_pickle_dir(root: Path, split: str) -> _Decoded:
    """Only ``split``'s batches: a directory need not hold the other one."""
    files = _PICKLE_TRAIN if split == "train" else _PICKLE_TEST
    if not any((root / name).is_file() for name in files):
        raise ValueError(f"{root} has no {split!r} split: {', '.join(files)} missing")
    blobs = {name: (root / name).read_bytes() for name in (*files, _PICKLE_META) if (root / name).is_file()}
    return _parse_pickles(blobs, str(root), "pickle batches")


def _image_entry(parts: Sequence[str]) -> tuple[str, str] | None:
    """(split, class) for a path ending in <split>/<class>/<image>, else None."""
    if len(parts) >= 3 and parts[-3] in SPLITS and parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return parts[-3], parts[-2]
    return None


def _read_image_dir(root: Path, num_workers: int | None) -> _Decoded:
    items = []  # (split, class, file name, display name, bytes)
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES) and not f.name.startswith("."):
                    items.append((split, class_dir.name, f.name, str(f), f.read_bytes()))
    return _assemble_images(items, str(root), "image folder", num_workers)


class _LastReadFile:
    """A read-only file wrapper that remembers the bytes of its latest read.

    tarfile ends its iteration quietly at a truncated or garbled header; the
    block it stopped at tells a real end-of-archive marker (512 zero bytes)
    from damage.
    """

    def __init__(self, fileobj):
        self._fileobj = fileobj
        self.last = b""

    def read(self, size=-1):
        self.last = self._fileobj.read(size)
        return self.last

    def seek(self, offset, whence=os.SEEK_SET):
        return self._fileobj.seek(offset, whence)

    def tell(self):
        return self._fileobj.tell()


def _decompressed(raw):
    """A file object over the tar bytes, whatever the compression."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def _read_archive(path: Path, num_workers: int | None) -> _Decoded:
    pickles: dict[str, tuple[str, bytes]] = {}  # file name -> (member dir, bytes)
    items = []
    last_member = "(none)"
    with open(path, "rb") as raw:
        try:
            stream = _LastReadFile(_decompressed(raw))
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                for member in tar:
                    last_member = member.name
                    if not member.isfile():
                        continue
                    parts = [p for p in member.name.split("/") if p not in ("", ".")]
                    if not parts or parts[-1].startswith("."):
                        continue
                    if parts[-1] in _PICKLE_FILES:
                        pickles[parts[-1]] = ("/".join(parts[:-1]), _read_member(tar, member, path))
                        continue
                    entry = _image_entry(parts)
                    if entry is not None:
                        prefix = "/".join(parts[:-3])
                        where = f"{member.name} in {path}"
                        items.append((*entry, parts[-1], where, _read_member(tar, member, path), prefix))
                if len(stream.last) != tarfile.BLOCKSIZE or any(stream.last):
                    raise tarfile.ReadError(f"a damaged or missing tar header after member {last_member!r}")
                # Reading on to the end reaches the gzip trailer, whose CRC and
                # length catch damage anywhere in the compressed stream.
                while stream.read(1 << 20):
                    pass
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            raise ValueError(f"{path}: corrupt or incomplete archive ({type(exc).__name__}: {exc})") from exc

    if pickles:
        folders = {folder for folder, _ in pickles.values()}
        if len(folders) > 1:
            raise ValueError(f"{path}: CIFAR-10 pickle batches in several folders: {sorted(folders)}")
        return _parse_pickles({k: v for k, (_, v) in pickles.items()}, f"{path}:{folders.pop() or '.'}", "tar of pickle batches")
    if not items:
        raise ValueError(
            f"{path}: no CIFAR-10 data in the archive: expected train/<class>/*.jpg|png and test/<class>/*.jpg|png, "
            f"or torchvision's pickle batches"
        )
    prefixes = {item[-1] for item in items}
    if len(prefixes) > 1:
        raise ValueError(f"{path}: image folders under several roots in the archive: {sorted(prefixes)[:5]}")
    return _assemble_images([item[:-1] for item in items], str(path), "tar of image folder", num_workers)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise ValueError(f"{path}: member {member.name} is truncated ({len(data)} of {member.size} bytes)")
    return data


def _assemble_images(items, where: str, layout: str, num_workers: int | None) -> _Decoded:
    if not items:
        raise ValueError(f"{where}: no images found under train/<class>/ or test/<class>/")
    classes = _class_order(item[1] for item in items)
    label_of = {name: i for i, name in enumerate(classes)}
    # Order within a split: label, then file name, whatever order the files were listed in.
    items = sorted(items, key=lambda it: (SPLITS.index(it[0]), label_of[it[1]], it[2]))
    suffixes = sorted({os.path.splitext(it[2])[1].lower().lstrip(".") for it in items})
    pixels = _decode_all([(it[3], it[4]) for it in items], num_workers)
    splits = {}
    start = 0
    for split in SPLITS:
        count = sum(1 for it in items if it[0] == split)
        if count:
            labels = np.array([label_of[it[1]] for it in items[start : start + count]], dtype=np.int64)
            splits[split] = (pixels[start : start + count], labels)
            start += count
    return _Decoded(splits, classes, f"{layout}, {'/'.join(suffixes)}")


def _decode_chunk(chunk: list[tuple[str, bytes]]) -> np.ndarray:
    """uint8 [len(chunk), 32, 32, 3] from (display name, encoded bytes) pairs. Runs in worker processes."""
    from PIL import Image  # pillow comes with torchvision; only decoding needs it

    out = np.empty((len(chunk), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (where, data) in enumerate(chunk):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image if image.mode == "RGB" else image.convert("RGB")
                array = np.asarray(image)
        except Exception as exc:  # Pillow raises many types for damaged files
            raise ValueError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None
        if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"{where}: image is {array.shape[1]}x{array.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        out[i] = array
    return out


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    # Measured on CIFAR-10's 60,000 JPEGs: 4.9 s in one process, 4.2 s with 2 workers.
    return min(cpus, 8)


def _decode_all(items: list[tuple[str, bytes]], num_workers: int | None) -> np.ndarray:
    workers = _default_workers() if num_workers is None else num_workers
    if workers <= 1 or len(items) < _POOL_MIN_IMAGES:
        return _decode_chunk(items)
    chunks = [items[i : i + _POOL_CHUNK] for i in range(0, len(items), _POOL_CHUNK)]
    # fork where there is one: workers need no re-import of torch or of the
    # caller's script; they only run Pillow on bytes they are handed.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            parts = list(pool.map(_decode_chunk, chunks))
    except (OSError, BrokenProcessPool) as exc:
        warnings.warn(f"decoding in one process: the process pool failed ({type(exc).__name__}: {exc})", stacklevel=3)
        return _decode_chunk(items)
    return np.concatenate(parts)


# ---------------------------------------------------------------------------
# CIFAR-10: the cache
# ---------------------------------------------------------------------------


def _fingerprint(kind: str, root: Path) -> str:
    """Hex key from the source's absolute path and the size and mtime of every file read from it."""

    def stat(path: Path) -> list:
        st = path.stat()
        return [str(path.relative_to(root)) if path != root else ".", st.st_size, st.st_mtime_ns]

    if kind == "archive":
        files = [stat(root)]
    else:
        files = [stat(p) for split in SPLITS if (root / split).is_dir() for p in sorted((root / split).rglob("*")) if p.is_file()]
    record = json.dumps({"version": _CACHE_VERSION, "kind": kind, "path": str(root), "files": files})
    return hashlib.sha256(record.encode()).hexdigest()[:24]


def _cache_file(kind: str, root: Path, cache: Path) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name)[:48] or "source"
    return cache / f"cifar10-{stem}-{_fingerprint(kind, root)}.npz"


def _read_source(kind: str, root: Path, num_workers: int | None) -> _Decoded:
    """Read and decode a source: the slow path the cache saves."""
    if kind == "archive":
        return _read_archive(root, num_workers)
    return _read_image_dir(root, num_workers)


def _cached_read(kind: str, root: Path, split: str, cache: Path, num_workers: int | None) -> _Decoded:
    """The source's splits: from the cache if it has the source, else decoded (both splits) and cached."""
    path = _cache_file(kind, root, cache)
    if path.is_file():
        try:
            return _load_cache(path, split)
        except Exception as exc:  # a damaged cache file is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {path} ({type(exc).__name__}: {exc}); decoding again", stacklevel=3)
    decoded = _read_source(kind, root, num_workers)
    _save_cache(path, decoded)
    return decoded


def _save_cache(path: Path, decoded: _Decoded) -> None:
    arrays = {"classes": np.array(decoded.classes), "layout": np.array(decoded.layout)}
    for split, (images, labels) in decoded.splits.items():
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed: a concurrent reader (another
        # rank, another run) sees the whole file or none.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # temporary files start private; the cache is as readable as the data
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write the decoded-image cache {path} ({exc}); the next call decodes again", stacklevel=4)


def _load_cache(path: Path, split: str) -> _Decoded:
    """Reads only ``split``'s arrays: the file holds both splits."""
    with np.load(path, allow_pickle=False) as f:
        classes = tuple(str(c) for c in f["classes"])
        layout = str(f["layout"])
        available = tuple(s for s in SPLITS if f"{s}_images" in f.files)
        if not available:
            raise ValueError("no splits in the file")
        splits = {}
        if split in available:
            images, labels = f[f"{split}_images"], f[f"{split}_labels"]
            if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or labels.shape != images.shape[:1]:
                raise ValueError(f"{split} arrays have unexpected shapes {images.shape}, {labels.shape}")
            splits[split] = (images, labels.astype(np.int64, copy=False))
    return _Decoded(splits, classes, layout, available)


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
    _check_int(n, "n", minimum=1)
    _check_int(seed, "seed")
    split = _check_split(split)
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
        g = _generator("synthetic", seed, split, block)
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


# ---------------------------------------------------------------------------
# batching and augmentation
# ---------------------------------------------------------------------------


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] = (images / 255 - mean) / std, per channel.

    mean, std: 3 floats, or float32 tensors broadcastable to [1, 3, 1, 1] on images' device.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise TypeError(f"images must be a uint8 tensor [B, H, W, 3], got {_describe(images)}")
    if not isinstance(mean, torch.Tensor):
        mean = torch.tensor(_check_triple(mean, "mean"), device=images.device).view(1, 3, 1, 1)
    if not isinstance(std, torch.Tensor):
        std = torch.tensor(_check_triple(std, "std", positive=True), device=images.device).view(1, 3, 1, 1)
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
        self.batch_size = _check_int(batch_size, "batch_size", minimum=1)
        for flag, name in ((shuffle, "shuffle"), (drop_last, "drop_last"), (augment, "augment")):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.padding = _check_int(padding, "padding", minimum=0)
        self.seed = _check_int(seed, "seed")
        self.world_size = _check_int(world_size, "world_size", minimum=1)
        self.rank = _check_int(rank, "rank", minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")

        self.dataset = dataset.to(device) if device is not None else dataset
        self.device = self.dataset.device
        mean = _check_triple(dataset.mean if mean is None else mean, "mean")
        std = _check_triple(dataset.std if std is None else std, "std", positive=True)
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
        self.epoch = _check_int(epoch, "epoch", minimum=0)
        _check_int(start_batch, "start_batch", minimum=0)
        if start_batch > len(self):
            raise ValueError(f"start_batch must be <= {len(self)} batches per epoch, got {start_batch}")
        self.start_batch = start_batch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's order and augmentation draws for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else _check_int(epoch, "epoch", minimum=0)
        n, w = len(self.dataset), self.world_size
        if self.shuffle:
            order = torch.randperm(n, generator=_generator("order", self.seed, epoch))
        else:
            order = torch.arange(n)
        total = self.num_samples * w
        # total <= n drops the tail; total > n repeats the start (n may even be < w).
        order = order.repeat(-(-total // n))[:total]
        indices = order[self.rank :: w]
        if self.augment:
            g = _generator("augment", self.seed, epoch)
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
