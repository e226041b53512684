"""lotus_kernels.recipe.data: CIFAR-10 from every supported layout (on tiny fake data),
the cache, the synthetic set, and DeviceLoader's order, sharding and augmentation."""

import os
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lotus_kernels.recipe.data import sources
from lotus_kernels.recipe.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    SYNTHETIC_CLASSES,
    DeviceLoader,
    ImageSet,
    crop_flip,
    load_cifar10,
    normalize,
    resolve_cifar10_source,
    split_holdout,
    synthetic_dataset,
)

# ---------------------------------------------------------------------------
# fake CIFAR-10 sources
# ---------------------------------------------------------------------------


def random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def smooth_images(n, seed):
    """Images JPEG keeps close to: a colour plus gentle gradients."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 60, 32)
    base = rng.integers(40, 150, (n, 1, 1, 3))
    return (base + ramp[None, :, None, None] + ramp[None, None, :, None]).astype(np.uint8)


def write_pickle_dir(root, protocol=2, bytes_keys=True):
    """torchvision's cifar-10-batches-py under root; returns {split: (images HWC, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    expected = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        images = random_images(4, seed=i)
        labels = np.random.default_rng(100 + i).integers(0, 10, 4).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(4, 3072)  # CHW planes per row
        with open(folder / name, "wb") as f:
            pickle.dump({key("data"): rows, key("labels"): labels, key("batch_label"): key(name)}, f, protocol=protocol)
        split = "test" if name == "test_batch" else "train"
        prev = expected.get(split, (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)))
        expected[split] = (np.concatenate([prev[0], images]), np.concatenate([prev[1], labels]))
    meta = {key("label_names"): [key(c) for c in CIFAR10_CLASSES], key("num_vis"): 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return folder, expected


def write_image_folder(root, per_split=(("train", 2), ("test", 1)), classes=CIFAR10_CLASSES, ext=".png", make=random_images):
    """root/<split>/<class>/NNNN<ext>; returns {split: (images, labels)} with labels in sorted-name
    order unless the classes are CIFAR-10's (whose label order happens to be alphabetical too)."""
    order = CIFAR10_CLASSES if set(classes) == set(CIFAR10_CLASSES) else tuple(sorted(classes))
    expected = {}
    seed = 0
    for split, count in per_split:
        images, labels = [], []
        for label, name in enumerate(order):
            folder = root / split / name
            folder.mkdir(parents=True)
            # Written in reverse so the loader cannot rely on creation order.
            batch = make(count, seed)
            seed += 1
            for j in reversed(range(count)):
                Image.fromarray(batch[j]).save(folder / f"{j:04d}{ext}", quality=95)
            images.extend(batch)
            labels.extend([label] * count)
        expected[split] = (np.stack(images), np.array(labels))
    return expected


def write_tar(src, dest, mode, members, prefix=""):
    with tarfile.open(dest, mode) as tar:
        for name in members:
            tar.add(src / name, arcname=f"{prefix}{name}")
    return dest


def assert_loaded(ds, images, labels, classes=CIFAR10_CLASSES):
    assert isinstance(ds, ImageSet) and ds.name == "cifar10"
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labels), 32, 32, 3)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(labels),)
    assert ds.classes == tuple(classes)
    assert ds.mean == CIFAR10_MEAN and ds.std == CIFAR10_STD
    assert torch.equal(ds.labels, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    assert torch.equal(ds.images, torch.from_numpy(images))


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def png_folder(tmp_path):
    root = tmp_path / "folder"
    return root, write_image_folder(root)


# ---------------------------------------------------------------------------
# CIFAR-10 layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (2, False), (pickle.HIGHEST_PROTOCOL, True)])
@pytest.mark.parametrize("parent", [False, True])
def test_pickle_dir_exact(tmp_path, cache, protocol, bytes_keys, parent):
    folder, expected = write_pickle_dir(tmp_path, protocol, bytes_keys)
    source = tmp_path if parent else folder
    for split in ("train", "test"):
        assert_loaded(load_cifar10(source, split, cache_dir=cache), *expected[split])
    assert not cache.exists()  # pickles are decoded already: nothing to cache


def test_pickle_tar_gz_exact(tmp_path, cache):
    folder, expected = write_pickle_dir(tmp_path / "src")
    archive = write_tar(folder.parent, tmp_path / "cifar-10-python.tar.gz", "w:gz", ["cifar-10-batches-py"])
    for split in ("train", "test"):
        assert_loaded(load_cifar10(archive, split, cache_dir=cache), *expected[split])


def test_image_folder_png_exact(png_folder, cache):
    root, expected = png_folder
    for split in ("train", "test"):
        ds = load_cifar10(root, split, cache_dir=cache)
        assert_loaded(ds, *expected[split])
        assert "image folder" in ds.source


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
@pytest.mark.parametrize("prefix", ["", "cifar10/"])
def test_image_folder_archive_exact(png_folder, tmp_path, cache, mode, suffix, prefix):
    root, expected = png_folder
    archive = write_tar(root, tmp_path / f"images{suffix}", mode, ["train", "test"], prefix)
    for split in ("train", "test"):
        assert_loaded(load_cifar10(str(archive), split, cache_dir=cache), *expected[split])


def test_jpeg_folder_shapes_and_labels(tmp_path, cache):
    expected = write_image_folder(tmp_path / "jpg", ext=".jpg", make=smooth_images)
    ds = load_cifar10(tmp_path / "jpg", "train", cache_dir=cache)
    images, labels = expected["train"]
    assert ds.images.shape == (20, 32, 32, 3) and ds.classes == CIFAR10_CLASSES
    assert torch.equal(ds.labels, torch.from_numpy(labels))
    assert (ds.images.float() - torch.from_numpy(images).float()).abs().mean() < 4  # JPEG loss only


def test_other_class_names_are_sorted(tmp_path, cache):
    expected = write_image_folder(tmp_path / "f", classes=("zebra", "apple", "mango"))
    ds = load_cifar10(tmp_path / "f", "train", cache_dir=cache)
    assert_loaded(ds, *expected["train"], classes=("apple", "mango", "zebra"))


def test_non_rgb_images_are_converted(tmp_path, cache):
    gray = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32).astype(np.uint8)
    rgba = random_images(1, 5)[0]
    for split in ("train", "test"):
        (tmp_path / "f" / split / "cat").mkdir(parents=True)
        Image.fromarray(gray, "L").save(tmp_path / "f" / split / "cat" / "a.png")
        Image.fromarray(np.dstack([rgba, np.full((32, 32), 7, np.uint8)]), "RGBA").save(tmp_path / "f" / split / "cat" / "b.png")
    ds = load_cifar10(tmp_path / "f", "test", cache_dir=cache)
    assert torch.equal(ds.images[0], torch.from_numpy(np.repeat(gray[..., None], 3, axis=2)))
    assert torch.equal(ds.images[1], torch.from_numpy(rgba))


def test_process_pool_decodes_the_same(png_folder, cache, monkeypatch):
    root, expected = png_folder
    monkeypatch.setattr(sources, "_POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(sources, "_POOL_CHUNK", 3)
    assert_loaded(load_cifar10(root, "train", cache_dir=cache, num_workers=2), *expected["train"])


# ---------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------


def test_cache_hit_skips_decoding(png_folder, tmp_path, cache, monkeypatch):
    root, expected = png_folder
    archive = write_tar(root, tmp_path / "a.tar.gz", "w:gz", ["train", "test"])
    first = load_cifar10(archive, "train", cache_dir=cache)
    assert len(list(cache.glob("cifar10-*.npz"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(sources, "_read_source", boom)
    again = load_cifar10(archive, "train", cache_dir=cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert_loaded(load_cifar10(archive, "test", cache_dir=cache), *expected["test"])  # one cache holds both splits

    # A changed source (new mtime) misses the cache.
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_cifar10(archive, "train", cache_dir=cache)


def test_cache_of_a_folder_sees_changed_files(png_folder, cache, monkeypatch):
    root, _ = png_folder
    load_cifar10(root, "train", cache_dir=cache)
    Image.fromarray(random_images(1, 99)[0]).save(root / "train" / "cat" / "0000.png")
    ds = load_cifar10(root, "train", cache_dir=cache)
    assert torch.equal(ds.images[3 * 2], torch.from_numpy(random_images(1, 99)[0]))  # cat = label 3, 2 per class


def test_damaged_cache_is_rebuilt(png_folder, cache):
    root, expected = png_folder
    load_cifar10(root, "train", cache_dir=cache)
    (path,) = cache.glob("cifar10-*.npz")
    path.write_bytes(b"not an npz file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        ds = load_cifar10(root, "train", cache_dir=cache)
    assert_loaded(ds, *expected["train"])
    assert_loaded(load_cifar10(root, "train", cache_dir=cache), *expected["train"])  # rewritten


# ---------------------------------------------------------------------------
# broken sources and bad arguments
# ---------------------------------------------------------------------------


def test_truncated_tar_gz_names_the_file(png_folder, tmp_path, cache):
    root, _ = png_folder
    whole = write_tar(root, tmp_path / "whole.tar.gz", "w:gz", ["train", "test"]).read_bytes()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"broken\.tar\.gz.*(corrupt|incomplete)"):
        load_cifar10(broken, "train", cache_dir=cache)


def test_truncated_plain_tar_names_the_file(png_folder, tmp_path, cache):
    root, _ = png_folder
    whole = write_tar(root, tmp_path / "whole.tar", "w", ["train", "test"]).read_bytes()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(whole[: len(whole) // 2 + 100])
    with pytest.raises(ValueError, match=r"broken\.tar"):
        load_cifar10(broken, "train", cache_dir=cache)


def test_not_an_archive_names_the_file(tmp_path, cache):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=r"junk\.tar\.gz"):
        load_cifar10(junk, "train", cache_dir=cache)


def test_missing_split_names_the_file(png_folder, tmp_path, cache):
    root, expected = png_folder
    archive = write_tar(root, tmp_path / "trainonly.tar", "w", ["train"])
    assert_loaded(load_cifar10(archive, "train", cache_dir=cache), *expected["train"])
    with pytest.raises(ValueError, match=r"trainonly\.tar.*'test'"):
        load_cifar10(archive, "test", cache_dir=cache)


def test_incomplete_pickle_dir_names_the_missing_file(tmp_path, cache):
    folder, _ = write_pickle_dir(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(folder, "train", cache_dir=cache)
    (folder / "data_batch_4").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    (folder / "data_batch_3").write_bytes((folder / "data_batch_5").read_bytes())
    with pytest.raises(ValueError, match="data_batch_4"):
        load_cifar10(folder, "train", cache_dir=cache)


def test_pickle_dir_reads_only_the_split_asked_for(tmp_path, cache):
    folder, expected = write_pickle_dir(tmp_path)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        (folder / name).unlink()
    assert_loaded(load_cifar10(folder, "test", cache_dir=cache), *expected["test"])
    with pytest.raises(ValueError, match=r"cifar-10-batches-py has no 'train' split"):
        load_cifar10(folder, "train", cache_dir=cache)
    (folder / "batches.meta").unlink()
    with pytest.raises(ValueError, match=r"batches\.meta is missing"):
        load_cifar10(folder, "test", cache_dir=cache)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_cannot_run_code(tmp_path, cache):
    folder, _ = write_pickle_dir(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load .*system"):
        load_cifar10(folder, "test", cache_dir=cache)


def test_wrong_image_size_names_the_file(tmp_path, cache):
    (tmp_path / "f" / "train" / "dog").mkdir(parents=True)
    Image.fromarray(random_images(1, 0)[0][:, :31]).save(tmp_path / "f" / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match=r"odd\.png.*31x32"):
        load_cifar10(tmp_path / "f", "train", cache_dir=cache)


def test_undecodable_image_names_the_member(tmp_path, cache):
    (tmp_path / "f" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "f" / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    archive = write_tar(tmp_path / "f", tmp_path / "a.tar", "w", ["train"])
    with pytest.raises(ValueError, match=r"train/dog/bad\.jpg in .*a\.tar"):
        load_cifar10(archive, "train", cache_dir=cache)


def test_bad_arguments(tmp_path, png_folder, cache):
    root, _ = png_folder
    with pytest.raises(ValueError, match="split must be one of .*'val'"):
        load_cifar10(root, "val", cache_dir=cache)
    with pytest.raises(TypeError, match="split"):
        load_cifar10(root, 1, cache_dir=cache)
    with pytest.raises(ValueError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere", cache_dir=cache)
    with pytest.raises(TypeError, match="source must be a path"):
        load_cifar10(123, cache_dir=cache)
    with pytest.raises(TypeError, match="cache_dir"):
        load_cifar10(root, cache_dir=3)
    with pytest.raises(ValueError, match="num_workers must be an int >= 1, got 0"):
        load_cifar10(root, num_workers=0, cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a CIFAR-10 directory"):
        load_cifar10(tmp_path / "empty", cache_dir=cache)


def test_download_failure_suggests_a_local_path(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match="offline.*local path"):
        load_cifar10("download", cache_dir=tmp_path)


def test_download_loads_what_torchvision_fetched(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")
    expected = {}

    def fake_cifar10(root, train, download):
        assert download and os.path.samefile(root, tmp_path)
        _, expected["all"] = write_pickle_dir(tmp_path)

    monkeypatch.setattr(datasets, "CIFAR10", fake_cifar10)
    assert_loaded(load_cifar10("download", "test", cache_dir=tmp_path), *expected["all"]["test"])


def test_resolve_source(tmp_path, monkeypatch, png_folder, cache):
    monkeypatch.delenv("LOTUS_CIFAR10", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert resolve_cifar10_source() is None
    default = tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz"
    default.parent.mkdir(parents=True)
    default.write_bytes(b"")
    assert resolve_cifar10_source() == str(default.resolve())
    monkeypatch.setenv("LOTUS_CIFAR10", "/from/env")
    assert resolve_cifar10_source() == "/from/env"
    assert resolve_cifar10_source(tmp_path / "given") == str(tmp_path / "given")
    with pytest.raises(TypeError, match="path"):
        resolve_cifar10_source(3)

    root, expected = png_folder
    monkeypatch.setenv("LOTUS_CIFAR10", str(root))
    assert_loaded(load_cifar10(split="test", cache_dir=cache), *expected["test"])


# ---------------------------------------------------------------------------
# ImageSet
# ---------------------------------------------------------------------------


def tiny_set(n=12, seed=0):
    images = torch.from_numpy(random_images(n, seed))
    labels = torch.arange(n) % 3
    return ImageSet(images, labels, ("a", "b", "c"), "toy", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def test_imageset_basics():
    ds = tiny_set()
    assert len(ds) == 12 and ds.device == torch.device("cpu") and ds.to("cpu") is ds
    sub = ds.subset([3, 1])
    assert torch.equal(sub.images, ds.images[[3, 1]]) and sub.labels.tolist() == [0, 1]
    assert len(ds.subset(slice(0, 5))) == 5 and len(ds.subset(ds.labels == 0)) == 4
    mean, std = ds.channel_stats()
    pixels = ds.images.double().reshape(-1, 3) / 255
    assert np.allclose(mean, pixels.mean(0)) and np.allclose(std, pixels.std(0, unbiased=False))


def test_imageset_rejects_bad_fields():
    ds = tiny_set()
    with pytest.raises(TypeError, match="images must be a uint8 tensor"):
        ImageSet(ds.images.float(), ds.labels, ds.classes, "x", ds.mean, ds.std)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        ImageSet(ds.images.permute(0, 3, 1, 2), ds.labels, ds.classes, "x", ds.mean, ds.std)
    with pytest.raises(TypeError, match="labels must be an int64"):
        ImageSet(ds.images, ds.labels.int(), ds.classes, "x", ds.mean, ds.std)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ImageSet(ds.images, ds.labels, ("a", "b"), "x", ds.mean, ds.std)
    with pytest.raises(ValueError, match="std must be positive"):
        ImageSet(ds.images, ds.labels, ds.classes, "x", ds.mean, (1, 0, 1))


def test_split_holdout():
    ds = tiny_set(50)
    rest, held = split_holdout(ds, 10, seed=1)
    assert len(rest) == 40 and len(held) == 10
    both = torch.cat([rest.images, held.images]).reshape(50, -1)
    assert torch.unique(both, dim=0).shape[0] == 50  # disjoint, covering
    again = split_holdout(ds, 10, seed=1)[1]
    assert torch.equal(again.images, held.images)
    with pytest.raises(ValueError, match="n_holdout"):
        split_holdout(ds, 51)


# ---------------------------------------------------------------------------
# the synthetic set
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth():
    return synthetic_dataset(2000, seed=0), synthetic_dataset(1000, seed=0, split="test")


def test_synthetic_is_deterministic_and_seeded(synth):
    train, test = synth
    assert train.name == "synthetic" and train.classes == SYNTHETIC_CLASSES
    assert train.images.shape == (2000, 32, 32, 3) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    again = synthetic_dataset(2000, seed=0)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    other = synthetic_dataset(2000, seed=1)
    assert (other.images != train.images).float().mean() > 0.5
    assert (test.images != train.images[:1000]).float().mean() > 0.5
    # Whole blocks of 1,000 do not depend on n.
    assert torch.equal(synthetic_dataset(1000, seed=0).images, train.images[:1000])


def test_synthetic_classes_balanced_and_range_used(synth):
    train, _ = synth
    assert torch.bincount(train.labels, minlength=10).tolist() == [200] * 10
    counts = torch.bincount(synthetic_dataset(37, seed=3).labels, minlength=10)
    assert counts.sum() == 37 and counts.max() - counts.min() <= 1
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    assert torch.unique(train.images).numel() == 256


def test_synthetic_mean_std_shared_and_close(synth):
    train, test = synth
    assert train.mean == test.mean == synthetic_dataset(10, seed=7).mean
    mean, std = train.channel_stats()
    assert np.allclose(mean, train.mean, atol=0.02) and np.allclose(std, train.std, atol=0.02)


def fourier_features(ds):
    """Translation-invariant: magnitude spectrum of each image's distance from its median colour."""
    x = ds.images.float().permute(0, 3, 1, 2) / 255
    median = x.flatten(2).median(-1).values[..., None, None]
    d = (x - median).abs().sum(1)
    spectrum = torch.fft.rfft2(d - d.mean((1, 2), keepdim=True)).abs()
    spectrum = spectrum / spectrum.flatten(1).norm(dim=1)[:, None, None]
    return torch.nn.functional.avg_pool2d(spectrum[:, None], 2).flatten(1)


def test_synthetic_classes_are_separable(synth):
    # Shapes sit at random positions, so raw pixels barely separate them; a
    # nearest-class-mean classifier on shift-invariant spectra does (measured
    # about 0.8 here against 0.1 chance; a 4-layer ViT reached 0.67 test accuracy
    # after 6 CPU epochs on 10,000 images).
    train, test = synth
    a, b = fourier_features(train), fourier_features(test)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    means = torch.stack([a[train.labels == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(b, means).argmin(1) == test.labels).float().mean()
    assert accuracy > 0.5, accuracy


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        synthetic_dataset(0)
    with pytest.raises(TypeError, match="n must be an int"):
        synthetic_dataset(10.0)
    with pytest.raises(ValueError, match="split"):
        synthetic_dataset(10, split="validation")
    with pytest.raises(TypeError, match="seed"):
        synthetic_dataset(10, seed="0")


# ---------------------------------------------------------------------------
# DeviceLoader
# ---------------------------------------------------------------------------


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def reference_crop_flip(image, dy, dx, flip, padding):
    """One image, plain numpy: zero-pad, cut the 32x32 window at (dy, dx), mirror."""
    h, w, c = image.shape
    padded = np.zeros((h + 2 * padding, w + 2 * padding, c), np.uint8)
    padded[padding : padding + h, padding : padding + w] = image
    out = padded[dy : dy + h, dx : dx + w]
    return out[:, ::-1] if flip else out


def test_every_sample_once_per_epoch_shapes_and_normalisation():
    ds = tiny_set(103)
    loader = DeviceLoader(ds, 10, seed=3)
    assert len(loader) == 11
    out = batches(loader)
    assert [len(y) for _, y in out] == [10] * 10 + [3]
    for x, y in out:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and x.is_contiguous()
        assert y.dtype == torch.int64
    order = loader.plan().indices
    assert sorted(order.tolist()) == list(range(103))
    assert order.tolist() != list(range(103))  # shuffled
    x = torch.cat([x for x, _ in out])
    assert torch.equal(torch.cat([y for _, y in out]), ds.labels[order])
    pixels = ds.images[order].numpy().astype(np.float64).transpose(0, 3, 1, 2) / 255
    expected = (pixels - np.array(ds.mean)[:, None, None]) / np.array(ds.std)[:, None, None]
    assert np.allclose(x.numpy(), expected, atol=1e-5)


def test_unshuffled_order_and_drop_last():
    ds = tiny_set(23)
    loader = DeviceLoader(ds, 5, shuffle=False, drop_last=True)
    out = batches(loader)
    assert len(loader) == len(out) == 4 and all(len(y) == 5 for _, y in out)
    assert torch.equal(torch.cat([y for _, y in out]), ds.labels[:20])


def test_same_seed_same_batches_other_epoch_other_order():
    ds = tiny_set(64)
    a = DeviceLoader(ds, 16, augment=True, seed=5)
    b = DeviceLoader(ds, 16, augment=True, seed=5)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(batches(a), batches(b), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.plan(0).indices, a.plan(1).indices)
    assert not torch.equal(a.plan(0).indices, DeviceLoader(ds, 16, seed=6).plan(0).indices)
    assert not torch.equal(a.plan(0).offsets, a.plan(1).offsets)


def test_resume_mid_epoch():
    ds = tiny_set(50)
    loader = DeviceLoader(ds, 8, augment=True, seed=1)
    loader.set_epoch(2)
    full = batches(loader)
    loader.set_epoch(2, start_batch=4)
    tail = batches(loader)
    assert len(tail) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(2, start_batch=len(loader) + 1)


def test_augmentation_independent_of_batching_and_rank():
    ds = tiny_set(40)
    one = DeviceLoader(ds, 7, augment=True, seed=2).plan(3)
    halves = [DeviceLoader(ds, 3, augment=True, seed=2, rank=r, world_size=2).plan(3) for r in (0, 1)]
    for r, half in enumerate(halves):
        assert torch.equal(half.indices, one.indices[r::2])
        assert torch.equal(half.offsets, one.offsets[r::2]) and torch.equal(half.flips, one.flips[r::2])


@pytest.mark.parametrize("n,world,drop_last", [(40, 2, False), (41, 2, False), (41, 2, True), (10, 3, False), (10, 3, True), (2, 4, False)])
def test_shards(n, world, drop_last):
    ds = tiny_set(n)
    loaders = [DeviceLoader(ds, 2, seed=7, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    plans = [loader.plan(1) for loader in loaders]
    sizes = {len(p.indices) for p in plans}
    assert len(sizes) == 1 and len({len(loader) for loader in loaders}) == 1  # equal shards, equal batch counts
    everything = torch.cat([p.indices for p in plans]).tolist()
    if drop_last:
        assert len(set(everything)) == len(everything) == (n // world) * world  # disjoint; tail dropped
    else:
        assert set(everything) == set(range(n))  # covering
        assert len(everything) == -(-n // world) * world  # padded by repetition
        if n % world == 0:
            assert len(set(everything)) == n  # disjoint
    for loader, plan in zip(loaders, plans, strict=True):
        loader.set_epoch(1)
        got = torch.cat([y for _, y in loader])
        expected = ds.labels[plan.indices]
        assert torch.equal(got, expected[: len(got)]) and len(got) == (len(expected) // 2 * 2 if drop_last else len(expected))


def test_augmentation_matches_per_image_reference():
    ds = tiny_set(200)
    loader = DeviceLoader(ds, 32, augment=True, seed=11)
    plan = loader.plan()
    flips = plan.flips.float().mean()
    assert 0.35 < flips < 0.65
    assert (plan.offsets != 4).any(dim=1).float().mean() > 0.8 and plan.offsets.min() == 0 and plan.offsets.max() == 8
    reference = np.stack(
        [
            reference_crop_flip(ds.images[i].numpy(), int(dy), int(dx), bool(f), 4)
            for i, (dy, dx), f in zip(plan.indices, plan.offsets, plan.flips, strict=True)
        ]
    )
    x = torch.cat([x for x, _ in loader])
    assert torch.equal(x, normalize(torch.from_numpy(reference), ds.mean, ds.std))
    plain = torch.cat([x for x, _ in DeviceLoader(ds, 32, seed=11)])
    assert not torch.equal(x, plain)


def test_no_augmentation_plan_is_identity():
    ds = tiny_set(9)
    plan = DeviceLoader(ds, 4, seed=0).plan()
    assert (plan.offsets == 4).all() and not plan.flips.any()
    images = ds.images[plan.indices]
    assert torch.equal(crop_flip(images, plan.offsets, plan.flips, 4), images)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 4),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    padding=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_crop_flip_matches_reference(b, h, w, padding, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=g)
    flips = torch.randint(0, 2, (b,), generator=g).bool()
    got = crop_flip(images, offsets, flips, padding)
    for i in range(b):
        want = reference_crop_flip(images[i].numpy(), int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i]), padding)
        assert np.array_equal(got[i].numpy(), want)


def test_loader_on_synthetic_uses_its_stats(synth):
    train, _ = synth
    x, _ = next(iter(DeviceLoader(train, 500, seed=0)))
    assert abs(float(x.mean())) < 0.15 and abs(float(x.std()) - 1) < 0.15


def test_loader_bad_arguments():
    ds = tiny_set(10)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        DeviceLoader(ds, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        DeviceLoader(ds, 2.0)
    with pytest.raises(TypeError, match="dataset must be an ImageSet"):
        DeviceLoader(ds.images, 2)
    with pytest.raises(ValueError, match="rank must be < world_size"):
        DeviceLoader(ds, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        DeviceLoader(ds, 2, world_size=0)
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        DeviceLoader(ds, 2, shuffle=1)
    with pytest.raises(ValueError, match="no batches"):
        DeviceLoader(ds, 6, drop_last=True, world_size=2)
    with pytest.raises(ValueError, match="std must be positive"):
        DeviceLoader(ds, 2, std=(1, 1, 0))
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        DeviceLoader(ds, 2).set_epoch(-1)
    with pytest.raises(ValueError, match="offsets must be"):
        crop_flip(ds.images[:2], torch.zeros(3, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool), 4)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    ds = tiny_set(70)
    cpu = DeviceLoader(ds, 16, augment=True, seed=4)
    gpu = DeviceLoader(ds, 16, augment=True, seed=4, device="cuda")
    assert gpu.dataset.device.type == "cuda"
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-6)
