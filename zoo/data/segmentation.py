"""Segmentation data sets for the zoo: ISBI 2012 EM membranes and Weizmann horses, plus joint augmentation.

Contract (the same as :mod:`zoo.data`):
  * The *data root* (``--data-dir`` / ``ZOO_DATA``) is only ever read; it may be read-only.
  * Everything derived from it (hash results, decoded arrays) goes into the *cache root* (``ZOO_CACHE``).
  * Every source file a loader reads is verified on every load against one *manifest digest* per data set
    embedded here: the sha256 of the text made of the sorted lines ``"<path relative to the data root> <sha256>\\n"``
    of exactly those files (see :func:`manifest_digest`). Per-file hashes are cached by ``_files_hashes`` keyed
    by (path, size, mtime), so the check is cheap after the first load. Unknown bytes raise
    :class:`~zoo.data.DataIntegrityError` naming the changed files; missing files raise
    :class:`~zoo.data.DataNotFoundError`. Neither set can be downloaded.
  * Decoded splits are cached as ``<cache>/data/<name>/<digest[:16]>/<split>_{images,labels}.npy``
    (``allow_pickle=False``; masks are uint8 on disk), next to ``manifest.txt``, the verified per-file listing.
  * Loaders return a :class:`SegmentationDataset`: uint8 images ``[N,C,H,W]`` and int64 masks ``[N,H,W]``
    with values in ``[0, info.num_classes)``.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zoo.data.base import (_ENV_HELP, ArrayDataset, DataIntegrityError, DataNotFoundError, DatasetInfo, Split,
                           _cached_arrays, _files_hashes, data_root, register_dataset)
from zoo.io import cache_root, write_text

_SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- in-memory data
class SegmentationDataset(ArrayDataset):
    """In-memory images (uint8 ``[N,C,H,W]``) and masks (int64 ``[N,H,W]``, values in ``[0, info.num_classes)``)
    with their :class:`~zoo.data.DatasetInfo` and ``names`` (the source file stems, e.g. ``"horse001"`` or ``"0"``;
    default ``"0"``, ``"1"``, ... by position).

    ``ds[i]`` returns ``(uint8 image(s), mask(s))`` like a TensorDataset; :meth:`batch` returns float32 images
    normalised with ``info.mean``/``info.std`` and the int64 masks.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, info: DatasetInfo,
                 names: Sequence[str] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != info.in_chans:
            raise ValueError(f"images must be uint8 [N,{info.in_chans},H,W], got {images.dtype} {tuple(images.shape)}")
        expected = (images.shape[0], *images.shape[2:])
        if masks.dtype != torch.int64 or tuple(masks.shape) != expected:
            raise ValueError(f"masks must be int64 {list(expected)} (one class index per pixel of each image), "
                             f"got {masks.dtype} {tuple(masks.shape)}")
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= info.num_classes):
            raise ValueError(f"mask values must lie in [0, {info.num_classes}), "
                             f"got min {int(masks.min())}, max {int(masks.max())}")
        names = [str(i) for i in range(len(images))] if names is None else [str(n) for n in names]
        if len(names) != len(images):
            raise ValueError(f"names must give one name per image: {len(names)} names for {len(images)} images")
        self.images, self.targets, self.info, self.names = images, masks, info, names

    @property
    def masks(self) -> torch.Tensor:
        return self.targets

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.info.name!r}, n={len(self)}, image_shape={tuple(self.images.shape[1:])})"

    def _take(self, idx: np.ndarray) -> "SegmentationDataset":
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return SegmentationDataset(self.images[t], self.masks[t], self.info, [self.names[i] for i in idx])

    def subset(self, n: int, seed: int = 0) -> "SegmentationDataset":
        """Random subset of exactly ``n`` samples (no replacement), deterministic given ``seed``; the samples
        keep their original relative order (and their names)."""
        if not 0 < n <= len(self):
            raise ValueError(f"n must be in [1, {len(self)}], got {n}")
        return self._take(np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False)))

    def resized(self, size: int, chunk: int = 32) -> "SegmentationDataset":
        """A new data set with images and masks resized to ``size x size`` (aspect ratio not kept).

        Images: area interpolation (the mean over each target pixel's footprint), rounded back to uint8.
        Masks: the one-hot masks are area-interpolated and the class with the largest covered fraction wins;
        ties go to the higher class index (the foreground, class 1, in both registered sets), so a 1-pixel
        membrane survives a 2x downscale instead of being dropped or broken up as with nearest neighbour. This
        biases the foreground fraction up slightly (ISBI at 256: 0.247 vs 0.229). ``info`` is shared (its
        ``image_size`` keeps the stored size).
        Processed ``chunk`` samples at a time to bound memory.
        """
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        size, k = int(size), self.info.num_classes
        xs, ys = [], []
        for s in range(0, len(self), chunk):
            x = F.interpolate(self.images[s:s + chunk].float(), size=(size, size), mode="area")
            xs.append(x.round_().clamp_(0, 255).to(torch.uint8))
            onehot = F.one_hot(self.masks[s:s + chunk], k).permute(0, 3, 1, 2).float()
            frac = F.interpolate(onehot, size=(size, size), mode="area")
            ys.append(k - 1 - frac.flip(1).argmax(1))  # argmax, ties to the higher class index
        empty_x = self.images.new_empty((0, self.images.shape[1], size, size))
        x = torch.cat(xs) if xs else empty_x
        y = torch.cat(ys) if ys else self.masks.new_empty((0, size, size))
        return SegmentationDataset(x, y, self.info, self.names)


# ----------------------------------------------------------------------------- augmentation
def augment_pair(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
                 crop: int | None = None, dihedral: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint random crop + flips of images and their masks, independently per sample, identically for the pair.

    ``images``: float ``[B,C,H,W]``; ``masks``: int64 ``[B,H,W]`` on the same device. Per sample, drawn from
    ``generator`` (on its device, in this order): a crop offset uniform in ``[0, H-crop] x [0, W-crop]``
    (``crop x crop`` window, no padding; ``crop=None`` keeps the full image), then a horizontal flip (p=0.5)
    and, with ``dihedral=True``, also a vertical flip (p=0.5) and a transpose (p=0.5): together the 8 elements of
    the dihedral group D4, each with probability 1/8 (the transpose needs square crops). Deterministic given the
    generator state. Vectorised: one gather per tensor, no loop over samples. Returns new tensors
    ``([B,C,crop,crop], [B,crop,crop])``; a crop larger than the images raises ValueError.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"augment_pair expects float [B,C,H,W] images, got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    if masks.dtype != torch.int64 or tuple(masks.shape) != (b, h, w):
        raise ValueError(f"augment_pair expects int64 masks [B,H,W] = {[b, h, w]} matching the images, "
                         f"got {masks.dtype} {tuple(masks.shape)}")
    if masks.device != images.device:
        raise ValueError(f"images and masks must be on the same device, got {images.device} and {masks.device}")
    if crop is None:
        ch, cw = h, w
    elif isinstance(crop, bool) or int(crop) != crop or crop < 1:
        raise ValueError(f"crop must be a positive int or None, got {crop!r}")
    elif crop > h or crop > w:
        raise ValueError(f"crop {crop} is larger than the {h}x{w} images (augment_pair does not pad)")
    else:
        ch = cw = int(crop)
    if dihedral and ch != cw:
        raise ValueError(f"dihedral augmentation transposes, which needs square crops; the images are {h}x{w}: "
                         "pass crop=N")
    gdev, dev = generator.device, images.device
    off_h = torch.randint(0, h - ch + 1, (b,), generator=generator, device=gdev).to(dev)
    off_w = torch.randint(0, w - cw + 1, (b,), generator=generator, device=gdev).to(dev)
    flips = (torch.rand(b, 3 if dihedral else 1, generator=generator, device=gdev) < 0.5).to(dev)
    ar_h, ar_w = torch.arange(ch, device=dev), torch.arange(cw, device=dev)
    vflip = flips[:, 1:2] if dihedral else torch.zeros_like(flips[:, :1])
    rows = off_h[:, None] + torch.where(vflip, ar_h.flip(0), ar_h)  # [B,ch]: source row of output row i
    cols = off_w[:, None] + torch.where(flips[:, :1], ar_w.flip(0), ar_w)  # [B,cw]: source column of output col j
    if dihedral:  # transposed samples read output (i, j) from (rows[j], cols[i])
        t = flips[:, 2, None, None]
        r_idx = torch.where(t, rows[:, None, :], rows[:, :, None])
        c_idx = torch.where(t, cols[:, :, None], cols[:, None, :])
    else:
        r_idx, c_idx = rows[:, :, None].expand(b, ch, cw), cols[:, None, :].expand(b, ch, cw)
    bi = torch.arange(b, device=dev)[:, None, None]
    out_x = images[bi, :, r_idx, c_idx].permute(0, 3, 1, 2).contiguous()
    return out_x, masks[bi, r_idx, c_idx]


# ----------------------------------------------------------------------------- verification
def manifest_digest(hashes: Mapping[str, str]) -> str:
    """sha256 (hex) of the text made of the sorted lines ``"<relative path> <sha256>\\n"`` of ``hashes``
    (relative path -> sha256 hex); the one digest per data set that pins every file a loader reads."""
    text = "".join(sorted(f"{path} {sha}\n" for path, sha in hashes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


_SOURCE_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*\d+\s*\|\s*`([0-9a-f]{64})`\s*\|\s*$")


def _trusted_listing(root: Path, folder: str, paths: Sequence[str], expected: str, cache: Path
                     ) -> dict[str, str] | None:
    """Per-file sha256 of ``paths`` from a listing whose manifest digest is ``expected`` (so the listing is
    authentic whatever its origin), or None. Tried: the listing cached by an earlier successful load, the
    table in ``<root>/<folder>/SOURCE.md`` and ``<root>/SHA256SUMS``. Only used to name changed files."""
    def parse(path: Path, kind: str) -> dict[str, str]:
        out = {}
        for line in path.read_text(errors="replace").splitlines():
            if kind == "manifest" and len(parts := line.split(" ")) == 2:
                out[parts[0]] = parts[1]
            elif kind == "source" and (m := _SOURCE_ROW.match(line.strip())):
                out[f"{folder}/{m.group(1)}"] = m.group(2)
            elif kind == "sums" and len(parts := line.split(None, 1)) == 2:
                out[parts[1].strip().removeprefix("*")] = parts[0]
        return out

    for path, kind in ((cache / "manifest.txt", "manifest"), (root / folder / "SOURCE.md", "source"),
                       (root / "SHA256SUMS", "sums")):
        try:
            listing = parse(path, kind)
        except OSError:
            continue
        if all(p in listing for p in paths) and manifest_digest({p: listing[p] for p in paths}) == expected:
            return {p: listing[p] for p in paths}
    return None


def _verify(root: Path, folder: str, paths: Sequence[str], expected: str, title: str, cache: Path
            ) -> dict[str, str]:
    """Check that every ``paths`` (relative to ``root``, all under ``root/folder``) exists and that their
    manifest digest is ``expected``; return ``{path: sha256}``. Raise DataNotFoundError / DataIntegrityError."""
    base = root / folder
    fix = (f"Fix: {_ENV_HELP} pointing at the folder that holds a complete copy of {folder}/ "
           "(zoo cannot download this data set).")
    if not base.is_dir():
        raise DataNotFoundError(
            f"{title} not found: expected the folder {base}/" +
            ("" if root.is_dir() else f" (the data root {root} does not exist)") + f". {fix}")
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{title} is incomplete: {len(missing)} of the {len(paths)} expected files are missing under {base}/, "
            f"e.g. {', '.join(str(root / p) for p in missing[:3])}. {fix}")
    sha = {p: h["sha256"] for p, h in zip(paths, _files_hashes([root / p for p in paths]))}
    digest = manifest_digest(sha)
    if digest != expected:
        ref = _trusted_listing(root, folder, paths, expected, cache)
        if ref is None:
            raise DataIntegrityError(
                f"{title}: the files under {base}/ do not match the expected contents (manifest sha256 {digest}, "
                f"expected {expected}); no trusted per-file listing was available to tell which of the "
                f"{len(paths)} files changed. They are probably truncated or corrupted: replace {base}/ with a "
                "fresh copy.")
        bad = [p for p in sorted(paths) if sha[p] != ref[p]]
        shown = "; ".join(f"{root / p} (sha256 {sha[p]}, expected {ref[p]})" for p in bad[:3])
        raise DataIntegrityError(
            f"{title}: {len(bad)} file(s) do not match their known sha256: {shown}"
            + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            + ". They are probably truncated or corrupted: replace them with a fresh copy.")
    if not (cache / "manifest.txt").is_file():
        write_text(cache / "manifest.txt", "".join(sorted(f"{p} {h}\n" for p, h in sha.items())))
    return sha


def _masks(y: torch.Tensor) -> torch.Tensor:
    """Cached masks (uint8 on disk) as int64; any other dtype is refused (a cache not written by zoo)."""
    if y.dtype != torch.uint8:
        raise ValueError(f"cached masks must be uint8, got {y.dtype}")
    return y.long()


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")


def _read_l(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


# ----------------------------------------------------------------------------- ISBI 2012
_ISBI_DIR = "isbi2012_em"
_ISBI_MANIFEST = "89c37b56df79cf82ac7ef75b434effc3e8fc98692dd0b9ebaa3d45a9b223044b"  # 60 png: image/ + label/
_ISBI_SPLITS = {"train": range(0, 20), "val": range(20, 25), "test": range(25, 30)}


@register_dataset("isbi2012")
class ISBI2012Info(DatasetInfo):
    """ISBI 2012 EM segmentation challenge (Arganda-Carreras et al. 2015; Cardona et al. 2010): 30 labelled
    serial-section TEM slices of the Drosophila larva ventral nerve cord, 512x512, grayscale; per pixel
    cell interior (class 0, label 255) vs membrane (class 1, label < 128; 21.96 % of all pixels).

    Reads ``<root>/isbi2012_em/train/{image,label}/{0..29}.png`` (60 files, pinned by one manifest digest).
    Fixed split by slice index into contiguous blocks of the stack: train = slices 0-19, val = 20-24,
    test = 25-29. Blocks rather than a random split because neighbouring sections are strongly correlated:
    interleaving them would leak near-copies of training slices into val/test. The challenge's own 30 test
    slices were never labelled and are not used. Normalisation constants: train-split mean and std of the
    pixel values in [0, 1]. EM sections have no preferred orientation, so all 8 elements of D4 (flips and
    transpose) are valid augmentations (``dihedral = True``).
    """

    task = "segmentation"
    num_classes, in_chans, image_size = 2, 1, (1, 512, 512)
    mean, std = (0.4865,), (0.1665,)
    classes = ("cell", "membrane")
    dihedral = True

    def load(self, split: Split = "train", data_dir: str | Path | None = None,
             download: bool = False) -> SegmentationDataset:
        """Return the whole ``split`` in memory. ``download`` is accepted for a uniform interface, but this
        set cannot be downloaded: missing files raise DataNotFoundError saying where to put them."""
        _check_split(split)
        root = data_root(data_dir)
        cache = cache_root() / "data" / self.name / _ISBI_MANIFEST[:16]
        paths = [f"{_ISBI_DIR}/train/{kind}/{i}.png" for kind in ("image", "label") for i in range(30)]
        _verify(root, _ISBI_DIR, paths, _ISBI_MANIFEST, "ISBI 2012 EM", cache)
        idx = list(_ISBI_SPLITS[split])

        def make() -> tuple[np.ndarray, np.ndarray]:
            base = root / _ISBI_DIR / "train"
            x = np.stack([_read_l(base / "image" / f"{i}.png") for i in idx])[:, None]
            y = np.stack([(_read_l(base / "label" / f"{i}.png") < 128).astype(np.uint8) for i in idx])
            return np.ascontiguousarray(x), y

        names = [str(i) for i in idx]
        return _cached_arrays(cache, split, make, lambda x, y: SegmentationDataset(x, _masks(y), self, names))


# ----------------------------------------------------------------------------- Weizmann horses
_HORSE_DIR = "weizmann_horse"
_HORSE_MANIFEST = "e41ac13af40c1fdc9ffd6008971aa4701f182c7556ee8a3dbf6bb69a41d18414"  # 656 jpg: rgb/ + figure_ground/
_HORSE_NAMES = tuple(f"horse{i:03d}" for i in range(1, 329))
_HORSE_SIZE = 256
_HORSE_HELD_OUT = 50  # images each in val and test
# the same photograph re-encoded at another size or quality (not byte-identical): 24x24 thumbnail correlation
# >= 0.995 for these pairs and <= 0.86 for every other pair of the 328 images; masks drawn separately (IoU 0.89-0.97)
HORSE_NEAR_DUPLICATES = (("horse004", "horse146"), ("horse071", "horse219"), ("horse118", "horse171"),
                         ("horse175", "horse205"), ("horse180", "horse203"), ("horse246", "horse294"),
                         ("horse263", "horse264"))
_HORSE_SPLIT_VERSION = 3  # part of the cache key (v1: byte-identical groups only; v2: train kept all copies)


def horse_splits(rgb_sha256: Mapping[str, str]) -> dict[str, list[str]]:
    """The Weizmann horse split from the rgb sha256 of each name (``{"horse001": sha, ...}``).

    Images with byte-identical rgb files, and the re-encoded copies in :data:`HORSE_NEAR_DUPLICATES`, form one
    group (a copy must not sit in train and in val/test); the groups, ordered by their first member's name, are visited in the order of
    ``numpy.random.default_rng(0).permutation(n_groups)``; each goes to val if it still fits in 50 images,
    else to test if that still fits in 50, else to train, where only its first member is kept: a photograph
    that appeared twice in the training set would be protected by DP only as a group of two. Returns sorted
    names per split.
    """
    parent = {name: name for name in rgb_sha256}  # union-find over "is a copy of"

    def find(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    first: dict[str, str] = {}
    links = [(first.setdefault(rgb_sha256[n], n), n) for n in sorted(rgb_sha256)]
    for a, b in links + [p for p in HORSE_NEAR_DUPLICATES if all(n in parent for n in p)]:
        ra, rb = sorted((find(a), find(b)))
        parent[rb] = ra
    groups: dict[str, list[str]] = {}
    for name in sorted(rgb_sha256):
        groups.setdefault(find(name), []).append(name)
    ordered = sorted(groups.values(), key=lambda g: g[0])
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for gi in np.random.default_rng(0).permutation(len(ordered)):
        group = ordered[gi]
        key = next((s for s in ("val", "test") if len(out[s]) + len(group) <= _HORSE_HELD_OUT), "train")
        out[key] += group[:1] if key == "train" else group  # train: one copy of each photograph
    return {s: sorted(v) for s, v in out.items()}


def _read_horse(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One horse at the storage size: (uint8 [3,S,S] image, uint8 [S,S] mask in {0,1})."""
    from PIL import Image

    base, size = root / _HORSE_DIR, (_HORSE_SIZE, _HORSE_SIZE)
    with Image.open(base / "figure_ground" / f"{name}.jpg") as m, Image.open(base / "rgb" / f"{name}.jpg") as im:
        mask = m.convert("L")
        rgb = im.convert("RGB").resize(mask.size, Image.Resampling.BILINEAR)  # pixel-align with the mask
        x = np.asarray(rgb.resize(size, Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        y = (np.asarray(mask.resize(size, Image.Resampling.BILINEAR)) > 127).astype(np.uint8)
    return x, y


@register_dataset("weizmann-horse")
class WeizmannHorseInfo(DatasetInfo):
    """Weizmann Horse Database (Borenstein & Ullman, ECCV 2002): 328 side-view colour photos of horses with
    binary figure-ground masks; per pixel background (class 0) vs horse (class 1).

    Reads ``<root>/weizmann_horse/{rgb,figure_ground}/horse001..horse328.jpg`` (656 files, pinned by one
    manifest digest; ``gray/`` is not used). Each rgb image (own resolution) is first resized to its mask's
    size (PIL bilinear; same aspect ratio within 0.56 %), then both go to the fixed storage size 256x256: the
    image with PIL bicubic (antialiased), the JPEG-compressed grayscale mask with PIL bilinear, then
    ``> 127`` = horse. The aspect ratio is not kept, and metrics are computed at 256x256 on these resized masks.

    Split (:func:`horse_splits`): 222 train / 50 val / 50 test (228 train images less the second copies of the
    6 copied photographs that fall in train). Two pairs of rgb files are byte-identical
    duplicates, (horse006, horse018) and (horse240, horse274), and seven further pairs are the same photograph
    re-encoded at another size (:data:`HORSE_NEAR_DUPLICATES`, found by comparing 24x24 thumbnails of all
    pairs); each of these nine pairs lies within one split, so no test image has a copy in train, and train keeps
    one copy of each (the unit of privacy is a photograph). Normalisation
    constants: train-split per-channel mean and std of the RGB values in [0, 1]. Horses stand upright, so only
    horizontal flips are valid augmentations (``dihedral = False``).
    """

    task = "segmentation"
    num_classes, in_chans, image_size = 2, 3, (3, _HORSE_SIZE, _HORSE_SIZE)
    mean, std = (0.5101, 0.4932, 0.4175), (0.2716, 0.2680, 0.2695)
    classes = ("background", "horse")
    dihedral = False
    duplicate_groups = (("horse006", "horse018"), ("horse240", "horse274"))  # byte-identical rgb files

    def load(self, split: Split = "train", data_dir: str | Path | None = None,
             download: bool = False) -> SegmentationDataset:
        """Return the whole ``split`` in memory. ``download`` is accepted for a uniform interface, but this
        set cannot be downloaded: missing files raise DataNotFoundError saying where to put them."""
        _check_split(split)
        root = data_root(data_dir)
        cache = cache_root() / "data" / self.name / f"{_HORSE_MANIFEST[:16]}-split{_HORSE_SPLIT_VERSION}"
        paths = [f"{_HORSE_DIR}/{kind}/{n}.jpg" for kind in ("rgb", "figure_ground") for n in _HORSE_NAMES]
        sha = _verify(root, _HORSE_DIR, paths, _HORSE_MANIFEST, "Weizmann horses", cache)
        names = horse_splits({n: sha[f"{_HORSE_DIR}/rgb/{n}.jpg"] for n in _HORSE_NAMES})[split]

        def make() -> tuple[np.ndarray, np.ndarray]:
            pairs = [_read_horse(root, n) for n in names]
            return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

        return _cached_arrays(cache, split, make, lambda x, y: SegmentationDataset(x, _masks(y), self, names))
