"""CIFAR-10 from local files (or a torchvision download): ``resolve_cifar10_source``
says where it comes from, ``load_cifar10`` reads it into an ``ImageSet``.

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
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import multiprocessing
import os
import pickle
import re
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from ..checks import check_int
from .image_set import IMAGE_SIZE, SPLITS, ImageSet, check_split


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and std of the 50,000 CIFAR-10 training images, pixels in
# [0, 1]. (The often-copied std (0.2023, 0.1994, 0.2010) is not the pixel std.)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

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
    split = check_split(split)
    if num_workers is not None:
        check_int(num_workers, "num_workers", minimum=1)
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
