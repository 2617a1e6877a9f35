"""Tests for zoo.data on the real CIFAR-10 data (ZOO_DATA must point at the data root)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo.data as zd
from zoo.data import images
from zoo.io import cache_root
from zoo.dp.objectives import check_batch

DATA = os.environ.get("ZOO_DATA")
needs_data = pytest.mark.skipif(not DATA, reason="ZOO_DATA is not set")


pytestmark = pytest.mark.usefixtures("isolated_cache")  # one session cache: the 170 MB archive is extracted once


@pytest.fixture(scope="session")
def cifar(cache_dir):
    if not DATA:
        pytest.skip("ZOO_DATA is not set")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_CACHE", str(cache_dir))
        info = zd.get_dataset_info("cifar10")
        t0 = time.perf_counter()
        train = info.load("train", data_dir=DATA)
        first = time.perf_counter() - t0
        test = info.load("test", data_dir=DATA)
    return train, test, first


# ----------------------------------------------------------------------------- roots & registry
def test_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    assert zd.data_root() == tmp_path
    assert zd.data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("ZOO_DATA")
    with pytest.raises(zd.DataNotFoundError, match="--data-dir.*ZOO_DATA") as e:
        zd.data_root()
    assert isinstance(e.value, FileNotFoundError)


def test_cache_root(monkeypatch, tmp_path):
    assert cache_root() == Path(os.environ["ZOO_CACHE"])
    monkeypatch.delenv("ZOO_CACHE")
    assert cache_root() == Path.home() / ".cache" / "zoo"


def test_registry():
    assert "cifar10" in zd.list_datasets()
    info = zd.get_dataset_info("cifar10")
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 3, (3, 32, 32))
    assert len(info.classes) == 10 and len(info.mean) == len(info.std) == 3
    with pytest.raises(zd.UnknownDatasetError, match="cifar10") as e:
        zd.get_dataset_info("cifar1O")
    assert isinstance(e.value, KeyError)
    with pytest.raises(ValueError):
        zd.register_dataset("cifar10")(type("Dup", (zd.DatasetInfo,), {}))


# ----------------------------------------------------------------------------- CIFAR-10 loading
@needs_data
def test_cifar10_shapes_counts_mean(cifar):
    train, test, _ = cifar
    assert train.images.shape == (50000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 3, 32, 32) and test.labels.dtype == torch.int64
    assert torch.bincount(train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    mean = torch.from_numpy(train.images.numpy().sum(axis=(0, 2, 3), dtype=np.uint64) / (50000 * 32 * 32 * 255))
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=1e-3)
    assert len(train) == 50000 and train[3][0].shape == (3, 32, 32)


@needs_data
def test_cifar10_second_load_cached(cifar, cache_dir):
    train, _, first = cifar
    t0 = time.perf_counter()
    again = zd.get_dataset_info("cifar10").load("train", data_dir=DATA)
    second = time.perf_counter() - t0
    print(f"first load {first:.2f}s, cached load {second:.3f}s")  # reported, not asserted (no timed tests)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    (extracted,) = [p for p in (cache_dir / "data" / "cifar10").iterdir() if p.is_dir()]
    assert extracted.name == images._CIFAR_SHA256_REPACK[:16]
    assert (extracted / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert sorted(p.name for p in extracted.glob("*.npy")) == [
        "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]
    assert not any(".tmp-" in p.name for p in extracted.parent.iterdir())


@needs_data
def test_corrupt_archive_refused(tmp_path):
    src = Path(DATA) / "cifar10" / "cifar-10-python.tar.gz"
    bad = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    bad.parent.mkdir()
    with open(src, "rb") as f:
        head = bytearray(f.read(1 << 20))  # a 1 MB truncated copy ...
    head[1000] ^= 0xFF  # ... with one byte changed
    bad.write_bytes(bytes(head))
    with pytest.raises(zd.DataIntegrityError) as e:
        zd.get_dataset_info("cifar10").load("test", data_dir=tmp_path)
    msg = str(e.value)
    assert str(bad) in msg and images._CIFAR_SHA256_REPACK in msg and images._CIFAR_MD5_OFFICIAL in msg
    assert isinstance(e.value, ValueError)


@needs_data
def test_extracted_folder_must_pass_torchvision_check(cifar, cache_dir, tmp_path):
    """An extracted cifar-10-batches-py/ is only used if it passes torchvision's md5 check (the re-pack does not)."""
    (src,) = (cache_dir / "data" / "cifar10").glob("*/cifar-10-batches-py")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).symlink_to(f)
    with pytest.raises(zd.DataIntegrityError, match="md5"):
        zd.get_dataset_info("cifar10").load("test", data_dir=tmp_path)


def test_missing_data_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(zd.DataNotFoundError) as e:
        zd.get_dataset_info("cifar10").load("train", data_dir=missing)
    msg = str(e.value)
    assert str(missing / "cifar10" / "cifar-10-python.tar.gz") in msg
    assert str(missing / "cifar10" / "cifar-10-batches-py") in msg
    assert "ZOO_DATA" in msg and "--download" in msg


# ----------------------------------------------------------------------------- ImageDataset
def _toy(n_per_class=(30, 20, 10)) -> zd.ImageDataset:
    labels = torch.cat([torch.full((k,), c, dtype=torch.int64) for c, k in enumerate(n_per_class)])
    images = torch.randint(0, 256, (len(labels), 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return zd.ImageDataset(images, labels, zd.get_dataset_info("cifar10"))


def test_subset_stratified_deterministic():
    ds = _toy()
    a, b, c = ds.subset(12, seed=1), ds.subset(12, seed=1), ds.subset(12, seed=2)
    assert len(a) == 12 and torch.bincount(a.labels).tolist() == [6, 4, 2]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert len(ds.subset(7, seed=0)) == 7
    with pytest.raises(ValueError):
        ds.subset(61)


@needs_data
def test_subset_real(cifar):
    sub = cifar[0].subset(1000, seed=0)
    assert torch.bincount(sub.labels, minlength=10).tolist() == [100] * 10


def test_batch_normalised():
    ds = _toy()
    x, y = ds.batch([0, 5, 40])
    assert x.dtype == torch.float32 and x.shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 1]
    info = ds.info
    expect = (ds.images[5, 1].float() / 255 - info.mean[1]) / info.std[1]
    assert torch.allclose(x[1, 1], expect)


def test_with_channels_repeats_grayscale_and_converts_rgb_to_luma():
    gray = zd.ImageDataset(torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                           zd.get_dataset_info("pneumoniamnist"))
    assert gray.with_channels(1) is gray
    x1, y1 = gray.batch([1, 2])
    x3, y3 = gray.with_channels(3).batch([1, 2])
    assert x3.shape == (2, 3, 6, 6) and torch.equal(y1, y3)
    assert all(torch.equal(x3[:, c], x1[:, 0]) for c in range(3))
    rgb = _toy()
    assert rgb.images.shape[1] == 3
    xg, _ = rgb.with_channels(1).batch([1, 2])  # RGB to a 1-channel model: the luma of the normalised channels
    xc, _ = rgb.batch([1, 2])
    assert torch.allclose(xg[:, 0], (xc * zd.LUMA.view(1, 3, 1, 1)).sum(1))
    with pytest.raises(ValueError, match="grayscale images are repeated to more channels, and RGB images"):
        rgb.with_channels(2)


def test_resized_classification_images():
    ds = _toy()
    up = ds.resized(12)
    assert up.images.shape == (len(ds), 3, 12, 12) and up.images.dtype == torch.uint8 and up.labels is ds.labels
    flat = zd.ImageDataset(torch.full((2, 1, 7, 7), 90, dtype=torch.uint8), torch.tensor([0, 1]),
                           zd.get_dataset_info("pneumoniamnist"))
    assert torch.equal(flat.resized(32).images, torch.full((2, 1, 32, 32), 90, dtype=torch.uint8))
    with pytest.raises(ValueError, match="positive int"):
        ds.resized(0)


def test_augment():
    x = torch.arange(16 * 3 * 32 * 32, dtype=torch.float32).reshape(16, 3, 32, 32)
    out1 = zd.augment(x, torch.Generator().manual_seed(0))
    out2 = zd.augment(x, torch.Generator().manual_seed(0))
    assert out1.shape == x.shape and out1.dtype == x.dtype
    assert torch.equal(out1, out2)
    # the centre 24x24 of each output is a (possibly flipped) crop of its own input at some offset;
    # samples get different offsets and both flip states occur
    draws = set()
    for i in range(16):
        c = out1[i, :, 4:28, 4:28]
        found = [(f, r, s) for f, img in enumerate((x[i], x[i].flip(-1)))
                 for r in range(9) for s in range(9) if torch.equal(c, img[:, r:r + 24, s:s + 24])]
        assert len(found) == 1
        draws.add(found[0])
    assert len(draws) > 8 and {f for f, _, _ in draws} == {0, 1}
    assert not torch.equal(out1, zd.augment(x, torch.Generator().manual_seed(1)))


def test_check_batch():
    x, y = torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 9])
    check_batch(x, y, num_classes=10, in_chans=3)
    cases = [
        (torch.zeros(3, 8, 8), y, ValueError, "4-D"),
        (torch.zeros(4, 1, 8, 8), y, ValueError, "expected 3 channels, got 1"),
        (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), y, TypeError, "floating"),
        (x.clone().index_fill_(0, torch.tensor([1]), float("nan")), y, ValueError, "NaN"),
        (x.clone().index_fill_(0, torch.tensor([2]), float("inf")), y, ValueError, "Inf"),
        (x, y.float(), TypeError, "int64"),
        (x, y.int(), TypeError, "int64"),
        (x, torch.tensor([0, 1, 2, 10]), ValueError, "out of range"),
        (x, torch.tensor([0, -1, 2, 3]), ValueError, "out of range"),
        (x, y[:3], ValueError, "batch size mismatch"),
        (x.numpy(), y, TypeError, "torch.Tensor"),
    ]
    for bx, by, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            check_batch(bx, by, num_classes=10, in_chans=3)


# ----------------------------------------------------------------------------- PneumoniaMNIST
@needs_data
def test_pneumoniamnist_splits_and_normalisation():
    info = zd.get_dataset_info("pneumoniamnist")
    sizes = {s: len(info.load(s, data_dir=DATA)) for s in ("train", "val", "test")}
    assert sizes == {"train": 4708, "val": 524, "test": 624}
    train = info.load("train", data_dir=DATA)
    assert train.images.shape == (4708, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [1214, 3494]
    x = train.images.double() / 255
    assert abs(x.mean().item() - info.mean[0]) < 1e-3 and abs(x.std().item() - info.std[0]) < 1e-3
    with pytest.raises(ValueError, match="split"):
        info.load("dev", data_dir=DATA)


@needs_data
def test_pneumoniamnist_tampered_or_missing_file_refused(tmp_path):
    info = zd.get_dataset_info("pneumoniamnist")
    with pytest.raises(zd.DataNotFoundError, match="pneumoniamnist.npz"):
        info.load("train", data_dir=tmp_path)
    bad = tmp_path / "pneumonia" / "pneumoniamnist.npz"
    bad.parent.mkdir()
    data = bytearray((Path(DATA) / "pneumonia" / "pneumoniamnist.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(zd.DataIntegrityError, match="md5"):
        info.load("train", data_dir=tmp_path)
