"""Tests for zoo.data.segmentation: the ISBI 2012 and Weizmann horse loaders on the real data ($ZOO_DATA), and
the joint image/mask augmentation."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo.data as zd
import zoo.data.segmentation as sd

SPLITS = ("train", "val", "test")


pytestmark = pytest.mark.usefixtures("isolated_cache")  # one session cache: each data set is decoded once


def _load_all(name: str, data_dir: Path, cache_dir: Path) -> dict[str, sd.SegmentationDataset]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_CACHE", str(cache_dir))
        info = zd.get_dataset_info(name)
        return {s: info.load(s, data_dir=data_dir) for s in SPLITS}


@pytest.fixture(scope="session")
def isbi(data_dir, cache_dir):
    return _load_all("isbi2012", data_dir, cache_dir)


@pytest.fixture(scope="session")
def horse(data_dir, cache_dir):
    return _load_all("weizmann-horse", data_dir, cache_dir)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(src: Path, dst: Path, pattern: str = "**/*") -> None:
    """Copy the files under ``src`` to ``dst`` as plain writable files (the data root is read-only)."""
    for f in src.glob(pattern):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / f.relative_to(src))


def _flip_byte(path: Path, offset: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- registry
def test_registry():
    isbi, horse = zd.get_dataset_info("isbi2012"), zd.get_dataset_info("weizmann-horse")
    assert (isbi.task, isbi.num_classes, isbi.in_chans, isbi.image_size) == ("segmentation", 2, 1, (1, 512, 512))
    assert (horse.task, horse.num_classes, horse.in_chans, horse.image_size) == ("segmentation", 2, 3, (3, 256, 256))
    assert isbi.classes == ("cell", "membrane") and horse.classes == ("background", "horse")
    assert isbi.dihedral is True and horse.dihedral is False
    assert len(isbi.mean) == len(isbi.std) == 1 and len(horse.mean) == len(horse.std) == 3
    assert zd.get_dataset_info("cifar10").task == "classification"
    with pytest.raises(ValueError, match="split"):
        isbi.load("validation")


# ----------------------------------------------------------------------------- ISBI 2012
def test_isbi_splits_shapes(isbi):
    expected = {"train": range(0, 20), "val": range(20, 25), "test": range(25, 30)}
    for split, ds in isbi.items():
        n = len(expected[split])
        assert isinstance(ds, sd.SegmentationDataset) and len(ds) == n
        assert ds.images.shape == (n, 1, 512, 512) and ds.images.dtype == torch.uint8
        assert ds.masks.shape == (n, 512, 512) and ds.masks.dtype == torch.int64
        assert set(ds.masks.unique().tolist()) == {0, 1}
        assert ds.names == [str(i) for i in expected[split]]
    names = [set(ds.names) for ds in isbi.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def test_isbi_labels_and_constants(isbi, data_dir):
    masks = torch.cat([ds.masks for ds in isbi.values()])
    assert abs(masks.float().mean().item() - 0.2196) < 5e-4  # SOURCE.md: 21.96 % membrane
    from PIL import Image  # class 1 = membrane = label pixels < 128 (the dark boundaries)
    label = np.asarray(Image.open(data_dir / "isbi2012_em/train/label/3.png"))
    assert torch.equal(isbi["train"].masks[3], torch.from_numpy((label < 128).astype(np.int64)))
    x = isbi["train"].images.double() / 255
    info = isbi["train"].info
    assert abs(x.mean().item() - info.mean[0]) < 1e-4 and abs(x.std().item() - info.std[0]) < 1e-4


# ----------------------------------------------------------------------------- Weizmann horses
def test_horse_splits_shapes(horse):
    assert {s: len(ds) for s, ds in horse.items()} == {"train": 222, "val": 50, "test": 50}
    for ds in horse.values():
        assert ds.images.shape == (len(ds), 3, 256, 256) and ds.images.dtype == torch.uint8
        assert ds.masks.shape == (len(ds), 256, 256) and ds.masks.dtype == torch.int64
        assert int(ds.masks.min()) == 0 and int(ds.masks.max()) == 1
    names = [set(ds.names) for ds in horse.values()]
    dropped = {f"horse{i:03d}" for i in range(1, 329)} - set.union(*names)  # second copies of train photographs
    assert sum(map(len, names)) == 322 and len(dropped) == 6
    assert all(any(n == b for _, b in sd.HORSE_NEAR_DUPLICATES + horse["train"].info.duplicate_groups) for n in dropped)


def test_horse_duplicates_stay_in_one_split(horse, data_dir):
    groups: dict[str, list[str]] = {}
    for f in sorted((data_dir / "weizmann_horse" / "rgb").glob("horse*.jpg")):
        groups.setdefault(_sha256(f), []).append(f.stem)
    dups = sorted(tuple(g) for g in groups.values() if len(g) > 1)
    assert dups == sorted(horse["train"].info.duplicate_groups) and len(dups) == 2
    split_of = {n: s for s, ds in horse.items() for n in ds.names}
    for group in [*groups.values(), *sd.HORSE_NEAR_DUPLICATES]:
        assert len({split_of.get(n, "train") for n in group}) == 1, group  # absent: a dropped train copy


def test_horse_near_duplicates_are_copies_and_no_other_pair_is(horse):
    """The listed copies still loaded (val/test keep both) correlate >= 0.95 as 24x24 grayscale thumbnails, and no
    other pair of the loaded images does (in particular no train image is a copy of a val/test image)."""
    names = [n for ds in horse.values() for n in ds.names]
    x = torch.cat([ds.images for ds in horse.values()]).float().mean(1, keepdim=True)
    t = torch.nn.functional.adaptive_avg_pool2d(x, 24).flatten(1)
    t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True)
    corr = t @ t.T / (t.shape[1] - 1)
    pairs = {tuple(sorted(p)) for p in [*sd.HORSE_NEAR_DUPLICATES, *horse["train"].info.duplicate_groups]
             if set(p) <= set(names)}  # train keeps one copy of each
    assert len(pairs) == 3
    high = {tuple(sorted((names[i], names[j]))) for i, j in zip(*torch.nonzero(torch.triu(corr, 1) >= 0.95).T.tolist())}
    assert high == pairs


def test_horse_masks_and_constants(horse):
    masks = torch.cat([ds.masks for ds in horse.values()]).float()
    per_image = masks.mean((1, 2))
    assert per_image.min() >= 0.05 and per_image.max() <= 0.45
    assert abs(per_image.mean().item() - 0.252) < 0.005  # SOURCE.md: mean 0.252 at the mask resolution
    info = horse["train"].info
    x = horse["train"].images.double() / 255
    assert np.allclose(x.mean((0, 2, 3)).numpy(), info.mean, atol=1e-4)
    assert np.allclose(x.std((0, 2, 3)).numpy(), info.std, atol=1e-4)


def test_horse_split_rule():
    sha = {f"horse{i:03d}": f"h{i}" for i in range(1, 329)}
    sha["horse010"] = sha["horse002"]  # a duplicate pair must land in one split
    a, b = sd.horse_splits(sha), sd.horse_splits(dict(reversed(sha.items())))
    sizes = {s: len(v) for s, v in a.items()}
    assert a == b and sizes["val"] == sizes["test"] == 50
    where = {s for s, v in a.items() if "horse002" in v or "horse010" in v}
    assert len(where) == 1  # one split; in train only the first copy is kept
    groups = [("horse002", "horse010"), *sd.HORSE_NEAR_DUPLICATES]
    in_train = [g for g in groups if set(g) & set(a["train"])]
    assert in_train and all(len(set(g) & set(a["train"])) == 1 for g in in_train)  # one copy kept in train
    assert sizes["train"] == 228 - len(in_train)


# ----------------------------------------------------------------------------- integrity
def _manifest_from_files(root: Path, paths: list[str]) -> str:
    return sd.manifest_digest({p: _sha256(root / p) for p in paths})


def test_manifest_digests_match_real_files(data_dir):
    isbi = [str(p.relative_to(data_dir)) for p in sorted((data_dir / "isbi2012_em" / "train").glob("*/*.png"))]
    horse = [str(p.relative_to(data_dir)) for d in ("rgb", "figure_ground")
             for p in sorted((data_dir / "weizmann_horse" / d).glob("*.jpg"))]
    assert len(isbi) == 60 and len(horse) == 656
    assert _manifest_from_files(data_dir, isbi) == sd._ISBI_MANIFEST
    assert _manifest_from_files(data_dir, horse) == sd._HORSE_MANIFEST
    sums = data_dir / "SHA256SUMS"
    if sums.is_file():  # the shared listing agrees with the files
        listing = {p.strip(): h for h, p in (line.split(None, 1) for line in sums.read_text().splitlines())}
        assert sd.manifest_digest({p: listing[p] for p in isbi}) == sd._ISBI_MANIFEST


def test_tampered_isbi_names_file(data_dir, isbi, tmp_path, monkeypatch):
    root = tmp_path / "root"
    _copy(data_dir / "isbi2012_em", root / "isbi2012_em")
    _flip_byte(root / "isbi2012_em/train/label/7.png")
    info = zd.get_dataset_info("isbi2012")
    # the decoded arrays of the real data are cached (by manifest digest): the check must still run
    with pytest.raises(zd.DataIntegrityError, match=r"label/7\.png.*fresh copy"):
        info.load("train", data_dir=root)
    # a fresh cache: the file is named through the listing in SOURCE.md, authenticated by the manifest
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(zd.DataIntegrityError, match=r"1 file\(s\).*label/7\.png"):
        info.load("test", data_dir=root)
    # no trusted listing at all: still an integrity error, with the fix
    (root / "isbi2012_em" / "SOURCE.md").unlink()
    with pytest.raises(zd.DataIntegrityError, match="fresh copy"):
        info.load("test", data_dir=root)
    assert not (tmp_path / "cache" / "data" / "isbi2012" / sd._ISBI_MANIFEST[:16] / "test_images.npy").exists()


def test_tampered_horse_names_file(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))  # fresh: the file is named via SOURCE.md
    root = tmp_path / "root"
    for d in ("rgb", "figure_ground"):
        _copy(data_dir / "weizmann_horse" / d, root / "weizmann_horse" / d)
    shutil.copyfile(data_dir / "weizmann_horse" / "SOURCE.md", root / "weizmann_horse" / "SOURCE.md")
    _flip_byte(root / "weizmann_horse/rgb/horse123.jpg", offset=1000)
    with pytest.raises(zd.DataIntegrityError, match=r"1 file\(s\).*rgb/horse123\.jpg"):
        zd.get_dataset_info("weizmann-horse").load("val", data_dir=root)


def test_missing_data(data_dir, tmp_path):
    for name, folder in (("isbi2012", "isbi2012_em"), ("weizmann-horse", "weizmann_horse")):
        with pytest.raises(zd.DataNotFoundError, match="--data-dir.*ZOO_DATA") as e:
            zd.get_dataset_info(name).load("train", data_dir=tmp_path, download=True)
        assert str(tmp_path / folder) in str(e.value) and "cannot download" in str(e.value)
    with pytest.raises(zd.DataNotFoundError, match="does not exist"):
        zd.get_dataset_info("isbi2012").load("train", data_dir=tmp_path / "nowhere")
    root = tmp_path / "partial"
    _copy(data_dir / "isbi2012_em", root / "isbi2012_em", "train/image/*.png")
    (root / "isbi2012_em/train/image/4.png").unlink()
    with pytest.raises(zd.DataNotFoundError, match="31 of the 60") as e:
        zd.get_dataset_info("isbi2012").load("val", data_dir=root)
    assert str(root / "isbi2012_em/train/image/4.png") in str(e.value)


def test_cache_is_plain_npy(isbi, cache_dir):
    folder = cache_dir / "data" / "isbi2012" / sd._ISBI_MANIFEST[:16]
    y = np.load(folder / "val_labels.npy", allow_pickle=False)
    assert y.dtype == np.uint8 and y.shape == (5, 512, 512)
    assert (folder / "manifest.txt").read_text().count("\n") == 60
    again = zd.get_dataset_info("isbi2012").load("val", data_dir=os.environ.get("ZOO_DATA"))
    assert torch.equal(again.images, isbi["val"].images) and torch.equal(again.masks, isbi["val"].masks)


# ----------------------------------------------------------------------------- SegmentationDataset
def test_dataset_validation():
    info = zd.get_dataset_info("isbi2012")
    x, y = torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 8, dtype=torch.int64)
    assert sd.SegmentationDataset(x, y, info).names == ["0", "1"]
    with pytest.raises(ValueError, match="uint8"):
        sd.SegmentationDataset(x.float(), y, info)
    with pytest.raises(ValueError, match=r"uint8 \[N,1,H,W\]"):
        sd.SegmentationDataset(x.expand(2, 3, 8, 8), y, info)
    with pytest.raises(ValueError, match="int64"):
        sd.SegmentationDataset(x, y.to(torch.uint8), info)
    with pytest.raises(ValueError, match="int64"):
        sd.SegmentationDataset(x, y[:, :4], info)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        sd.SegmentationDataset(x, y + 2, info)
    with pytest.raises(ValueError, match="names"):
        sd.SegmentationDataset(x, y, info, ["a"])


def test_batch_normalises(horse, isbi):
    ds = horse["val"]
    x, y = ds.batch(slice(0, 4))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 256, 256) and torch.equal(y, ds.masks[:4])
    mean, std = torch.tensor(ds.info.mean).view(1, 3, 1, 1), torch.tensor(ds.info.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (ds.images[:4].float() / 255 - mean) / std)
    x2, y2 = ds.batch([0, 1, 2, 3])
    x3, _ = ds.batch(torch.arange(4))
    assert torch.equal(x, x2) and torch.equal(x, x3) and torch.equal(y, y2)
    xt, _ = isbi["train"].batch(slice(None))  # the constants are the train statistics
    assert xt.mean().abs() < 1e-3 and (xt.std() - 1).abs() < 1e-3
    img, mask = ds[1]
    assert img.shape == (3, 256, 256) and mask.shape == (256, 256) and len(ds.tensors) == 2


def test_subset(horse):
    ds = horse["train"]
    a, b, c = ds.subset(20, seed=1), ds.subset(20, seed=1), ds.subset(20, seed=2)
    assert len(a) == 20 and a.names == b.names and a.names != c.names
    pos = [ds.names.index(n) for n in a.names]
    assert pos == sorted(pos) and torch.equal(a.images, ds.images[pos]) and torch.equal(a.masks, ds.masks[pos])
    for n in (0, len(ds) + 1):
        with pytest.raises(ValueError):
            ds.subset(n)


def test_resized(isbi, horse):
    for ds, size in ((isbi["train"], 128), (isbi["val"], 256), (horse["val"], 64), (horse["test"], 100)):
        r = ds.resized(size)
        assert r.images.shape == (len(ds), ds.info.in_chans, size, size) and r.images.dtype == torch.uint8
        assert r.masks.shape == (len(ds), size, size) and r.masks.dtype == torch.int64 and r.names == ds.names
        assert abs(r.masks.float().mean().item() - ds.masks.float().mean().item()) < 0.03
        assert abs(r.images.float().mean().item() - ds.images.float().mean().item()) < 0.5
    # a 1-pixel line survives a 2x downscale (nearest neighbour would drop it or keep it by phase)
    m = torch.zeros(1, 8, 8, dtype=torch.int64)
    m[0, :, 3] = 1
    small = sd.SegmentationDataset(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), m, isbi["val"].info).resized(4)
    assert small.masks[0, :, 1].tolist() == [1, 1, 1, 1] and small.masks.sum() == 4


# ----------------------------------------------------------------------------- augment_pair
def _coords(b: int, c: int, h: int, w: int, gen: torch.Generator):
    """Images whose channels encode each pixel's (row, col) and masks holding the pixel id row*w+col."""
    rows = torch.arange(h).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.arange(w).view(1, 1, 1, w).expand(b, 1, h, w)
    noise = torch.rand(b, c - 2, h, w, generator=gen)
    images = torch.cat([rows.float(), cols.float(), noise], 1)
    return images, (rows * w + cols)[:, 0].clone()


def _d4(m: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in (m, m.T):
        out += [t, t.flip(1), t.flip(0), t.flip(0).flip(1)]
    return out


@pytest.mark.parametrize("dihedral", [False, True])
def test_augment_pair_alignment(dihedral):
    gen = torch.Generator().manual_seed(0)
    h, w, crop, b = 12, 12, 8, 256
    images, masks = _coords(b, 3, h, w, gen)
    x, y = sd.augment_pair(images, masks, torch.Generator().manual_seed(1), crop=crop, dihedral=dihedral)
    assert x.shape == (b, 3, crop, crop) and y.shape == (b, crop, crop) and y.dtype == torch.int64
    assert torch.equal(x[:, 0].long() * w + x[:, 1].long(), y)  # image and mask moved together
    src_noise = images[:, 2].flatten(1).gather(1, y.flatten(1)).view(b, crop, crop)
    assert torch.equal(x[:, 2], src_noise)  # every channel moved with them
    seen = set()
    ids = torch.arange(h * w).view(h, w)
    for i in range(b):  # each output is an element of D4 (or of {id, hflip}) applied to a crop
        r0, c0 = divmod(int(y[i].min()), w)
        cands = _d4(ids[r0:r0 + crop, c0:c0 + crop])
        k = next(k for k, cand in enumerate(cands) if torch.equal(cand, y[i]))
        seen.add(k)
    assert seen == (set(range(8)) if dihedral else {0, 1})


def test_augment_pair_full_and_rect():
    gen = torch.Generator().manual_seed(0)
    images, masks = _coords(16, 2, 6, 10, gen)
    x, y = sd.augment_pair(images, masks, torch.Generator().manual_seed(0))
    assert x.shape == images.shape and torch.equal(x[:, 0].long() * 10 + x[:, 1].long(), y)
    flipped = y[:, 0, 0] == 9
    assert flipped.any() and (~flipped).any() and torch.equal(y[flipped], masks[flipped].flip(-1))
    x, y = sd.augment_pair(images, masks, torch.Generator().manual_seed(0), crop=5, dihedral=True)
    assert x.shape == (16, 2, 5, 5) and torch.equal(x[:, 0].long() * 10 + x[:, 1].long(), y)
    with pytest.raises(ValueError, match="square"):
        sd.augment_pair(images, masks, gen, dihedral=True)


def test_augment_pair_determinism_and_errors():
    images, masks = _coords(32, 3, 16, 16, torch.Generator().manual_seed(0))
    a = sd.augment_pair(images, masks, torch.Generator().manual_seed(5), crop=10, dihedral=True)
    b = sd.augment_pair(images, masks, torch.Generator().manual_seed(5), crop=10, dihedral=True)
    c = sd.augment_pair(images, masks, torch.Generator().manual_seed(6), crop=10, dihedral=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="larger"):
        sd.augment_pair(images, masks, gen, crop=17)
    with pytest.raises(ValueError, match="crop"):
        sd.augment_pair(images, masks, gen, crop=0)
    with pytest.raises(ValueError, match="float"):
        sd.augment_pair(images.long(), masks, gen)
    with pytest.raises(ValueError, match="int64"):
        sd.augment_pair(images, masks[:, :8], gen)
    assert images.shape == (32, 3, 16, 16) and masks.max() == 255  # inputs untouched


def test_augment_pair_on_real_batch(isbi):
    x, y = isbi["val"].batch(slice(0, 2))
    gen = torch.Generator().manual_seed(0)
    xa, ya = sd.augment_pair(x, y, gen, crop=256, dihedral=True)
    assert xa.shape == (2, 1, 256, 256) and ya.shape == (2, 256, 256)
    assert abs(ya.float().mean().item() - y.float().mean().item()) < 0.05
