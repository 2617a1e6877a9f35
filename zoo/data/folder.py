"""Your own classification data, by path: wherever zoo takes a registered data set's name, it takes a path too.

Three forms (:func:`from_path` tells them apart):

- a **MedMNIST-style ``.npz``**: ``train_images``/``train_labels`` and optionally ``val_*`` and ``test_*``; images
  ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3), 8-bit (``uint8``); labels ``[N]`` or ``[N, 1]``, integers from 0;
- an **ImageFolder tree** (torchvision's layout): ``train/<class>/*.png|jpg|...``, optionally ``val/`` and
  ``test/`` with the same class folders; classes are the sorted folder names of ``train/``;
- for **segmentation**, ``images/`` and ``masks/`` with matching file names (or ``train/images/``,
  ``train/masks/`` and optionally the same under ``val/`` and ``test/``). Masks are 8-bit images of class indices
  0..K-1, or binary 0/255 (read as background 0 / foreground 1).

Without a test split, a stratified 20 % of the training images is held out with seed 0, and the split is recorded
(``manifest["split"]``). Images must share one size (zoo does not guess how to resize a mixed set) and be 8-bit;
grayscale and RGB images in one tree are all read as RGB.

**What a run records.** The returned :class:`PathDataset` is named by the resolved path and carries a
``manifest``: the form, the path, the classes, channels and size, the images per split, and a sha256 over the
content (the ``.npz`` file's own sha256, or for a tree the sha256 of the sorted ``split/class/file sha256``
lines). Training writes the manifest into the checkpoint's privacy ledger, so that ``zoo eval CHECKPOINT`` works in
a fresh process, and anything that claims to be the same data (evaluation, resuming, composing a fine-tuning budget)
refuses content that differs from it.

**Normalisation never uses statistics of the data.** Mean and std are fixed constants (0.5 and 0.5 per channel,
timm's "inception" constants, mapping [0, 1] to [-1, 1]). Statistics computed from private images would be a
release of those images that no privacy ledger accounts for; fixed constants cost nothing and the per-sample
normalisation layers of every zoo model (GroupNorm family) absorb the rest.

**Checks** (each error names the file or index and says what to do): unreadable image files, mixed image sizes,
non-8-bit or non-finite arrays, labels outside the classes or classes without a training image, fewer than
:data:`MIN_TRAIN` training images, and the same image in two splits (a leak between training and evaluation).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from zoo.data.base import (DataIntegrityError, DataNotFoundError, DatasetInfo, ImageDataset, Split, add_dataset,
                           _files_hashes)
from zoo.data.segmentation import SegmentationDataset

FIXED_MEAN, FIXED_STD = 0.5, 0.5
"""Per-channel normalisation of data given by path (never statistics of the data itself)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TEST_FRACTION, SPLIT_SEED = 0.2, 0
"""Without a test split: this stratified fraction of the training images is held out, with this seed."""
MIN_TRAIN, MIN_TRAIN_SEGMENTATION = 10, 4
"""Fewest training images zoo trains on privately (classification, segmentation): below them no delta < 1/N gives
a meaningful guarantee, and no recipe learns anything under noise. A segmentation image carries many pixels of
signal (ISBI 2012 trains on 20 slices), hence the lower floor."""


class BadDataError(ValueError):
    """The data given by path cannot be used as it is; the message names the file or index and the fix."""


class PathDataset(DatasetInfo):
    """A data set read from a path (:func:`from_path`): all splits in memory, uint8 images ``[N,C,H,W]`` and
    int64 labels ``[N]`` (classification) or masks ``[N,H,W]`` (segmentation). ``name`` is the resolved path;
    ``manifest`` describes the content (module docstring)."""

    def __init__(self, path: Path, form: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                 classes: tuple[str, ...], digest: str, split_record: dict | None, files: int,
                 task: str = "classification"):
        self.task = task
        self.name = str(path)
        self.path = path
        self.classes = classes
        self.num_classes = len(classes)
        x = splits["train"][0]
        self.in_chans = int(x.shape[1])
        self.image_size = (self.in_chans, int(x.shape[2]), int(x.shape[3]))
        self.mean, self.std = (FIXED_MEAN,) * self.in_chans, (FIXED_STD,) * self.in_chans
        self.normalisation_source = (f"fixed constants mean {FIXED_MEAN}, std {FIXED_STD} per channel (never "
                                     "statistics of the private data)")
        self._splits = splits
        self.manifest = {"form": form, "task": task, "path": str(path), "sha256": digest, "files": files,
                         "classes": list(classes), "channels": self.in_chans, "size": list(self.image_size[1:]),
                         "images": {s: int(len(y)) for s, (_, y) in splits.items()}, "split": split_record}

    def load(self, split: Split = "train", data_dir=None, download: bool = False) -> ImageDataset:
        if split not in self._splits:
            raise ValueError(f"{self.path} has no {split!r} split; it has {sorted(self._splits)}")
        x, y = self._splits[split]
        if self.task == "segmentation":
            return SegmentationDataset(torch.from_numpy(x), torch.from_numpy(y), self)
        return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), self)

    def check_same(self, manifest: dict | None, what: str) -> None:
        """Raise :class:`DataIntegrityError` when ``manifest`` (recorded by a run) describes other content."""
        if manifest and manifest.get("sha256") != self.manifest["sha256"]:
            raise DataIntegrityError(
                f"{self.path} is not the data {what} was trained on: its content sha256 is "
                f"{self.manifest['sha256'][:16]}..., the run recorded {manifest['sha256'][:16]}... "
                f"({manifest.get('form')} at {manifest.get('path')}, {manifest.get('images')} images). Restore the "
                "original files, or evaluate it as another data set (zoo eval CHECKPOINT --dataset PATH)")


_CACHE: dict[tuple, PathDataset] = {}


def looks_like_path(name: str) -> bool:
    """Whether a ``--dataset`` value is meant as a path rather than a registered name."""
    return "/" in name or "\\" in name or name.endswith(".npz") or name.startswith(".") or name.startswith("~") \
        or Path(name).expanduser().exists()


def from_path(path: str | Path) -> PathDataset:
    """The data at ``path`` (a ``.npz`` file or an ImageFolder tree, module docstring), read once per process
    while its files are unchanged. Raises :class:`~zoo.data.DataNotFoundError` when nothing is there and
    :class:`BadDataError` for data that cannot be used as it is."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise DataNotFoundError(f"no data at {p}: give a MedMNIST-style .npz file or a folder with train/<class>/ "
                                "images (see zoo.data.folder), or a registered data set name (zoo.data.list_datasets())")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    key = (str(p), tuple((str(f), st.st_size, st.st_mtime_ns) for f in files for st in (f.stat(),)))
    if key not in _CACHE:
        if p.is_file():
            if p.suffix != ".npz":
                raise BadDataError(f"{p} is a {p.suffix or 'suffix-less'} file; zoo reads a .npz file (train_images, "
                                   "train_labels, ...) or a folder with train/<class>/ images")
            _CACHE[key] = _read_npz(p)
        elif (p / "masks").is_dir() or (p / "train" / "masks").is_dir():
            _CACHE[key] = _read_seg_tree(p, files)
        else:
            _CACHE[key] = _read_tree(p, files)
    return _CACHE[key]


def from_arrays(name: str, train_images, train_labels, test_images=None, test_labels=None,
                classes: tuple[str, ...] | None = None) -> PathDataset:
    """In-memory arrays (the ``.npz`` form's, module docstring) as a data set, registered under ``name`` in this
    process so that ``zoo.train(..., dataset=name)`` uses it; the same checks as a path's apply. The manifest's
    sha256 is over the arrays, so evaluating a checkpoint in another process needs the same arrays registered again
    under the same name."""
    arrays = {"train_images": np.asarray(train_images), "train_labels": np.asarray(train_labels)}
    if test_images is not None:
        arrays.update(test_images=np.asarray(test_images), test_labels=np.asarray(test_labels))
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode() + str(arrays[k].dtype).encode() + str(arrays[k].shape).encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    ds = _from_arrays(Path(name), "arrays", arrays, h.hexdigest(), f"arrays {name!r}", classes)
    ds.name = name
    ds.manifest["path"] = None
    add_dataset(ds)
    return ds


def _read_npz(p: Path) -> PathDataset:
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BadDataError(f"{p} cannot be read as a .npz file ({e}); re-save it with numpy.savez") from None
    return _from_arrays(p, "npz", arrays, _files_hashes([p])[0]["sha256"], str(p), None)


def _from_arrays(p: Path, form: str, arrays: dict, digest: str, where: str,
                 classes: tuple[str, ...] | None) -> PathDataset:
    if "train_images" not in arrays or "train_labels" not in arrays:
        raise BadDataError(f"{where} has {sorted(arrays)}; it needs train_images and train_labels (and optionally "
                           "val_images/val_labels, test_images/test_labels), MedMNIST's layout")
    splits = {}
    for split in ("train", "val", "test"):
        if f"{split}_images" not in arrays:
            continue
        if f"{split}_labels" not in arrays:
            raise BadDataError(f"{where} has {split}_images but no {split}_labels")
        splits[split] = (_images(arrays[f"{split}_images"], f"{where}: {split}_images"),
                         _labels(arrays[f"{split}_labels"], f"{where}: {split}_labels"))
        if len(splits[split][0]) != len(splits[split][1]):
            raise BadDataError(f"{where}: {split}_images holds {len(splits[split][0])} images but {split}_labels "
                               f"{len(splits[split][1])} labels; give one label per image")
    shapes = {s: x.shape[1:] for s, (x, _) in splits.items()}
    if len(set(shapes.values())) > 1:
        raise BadDataError(f"{where}: the splits have images of different shapes {shapes}; give every split the "
                           "same size and channels")
    k = int(splits["train"][1].max()) + 1 if len(splits["train"][1]) else 0
    if classes is not None:
        k = len(classes)
    classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(k))
    return _finish(p, form, splits, classes, digest, where, files=1)


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 ``[N, H, W]`` / ``[N, H, W, C]`` -> ``[N, C, H, W]``."""
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            i = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))[0])
            raise BadDataError(f"{where}: image {i} holds NaN or infinite values; fix or drop it (zoo takes 8-bit "
                               "images)")
        hint = (" If they lie in [0, 1], convert with (x * 255).round().astype(numpy.uint8)."
                if np.issubdtype(x.dtype, np.floating) else
                " Rescale them to 0-255 and convert with .astype(numpy.uint8).")
        raise BadDataError(f"{where} are {x.dtype}; zoo takes 8-bit images (uint8, 0-255).{hint}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise BadDataError(f"{where} has shape {x.shape}; give [N, H, W] (grayscale) or [N, H, W, C] with C = 1 or 3")
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise BadDataError(f"{where} has shape {y.shape}; give one class index per image ([N] or [N, 1]); "
                           "multi-label data is not supported")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            i = int(np.flatnonzero(~(np.isfinite(y) & (y == np.round(y))))[0])
            raise BadDataError(f"{where}: label {i} is {y[i]!r}, not a class index (an integer from 0)")
    return y.astype(np.int64)


def _read_tree(p: Path, files: list[Path]) -> PathDataset:
    if not (p / "train").is_dir():
        raise BadDataError(f"{p} has no train/ folder; an image folder needs train/<class>/*.png|jpg (optionally "
                           "val/ and test/ with the same class folders)")
    classes = tuple(sorted(d.name for d in (p / "train").iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise BadDataError(f"{p / 'train'} has {len(classes)} class folder(s) {list(classes)}; give one folder per "
                           "class, at least 2")
    hashes = dict(zip(files, (h["sha256"] for h in _files_hashes(files))))
    lines, raw, size, rgb = [], {}, None, False
    for split in ("train", "val", "test"):
        root = p / split
        if not root.is_dir():
            continue
        for d in sorted(x for x in root.iterdir() if x.is_dir()):
            if d.name not in classes:
                raise BadDataError(f"{d} is a class that train/ does not have (train/ has {list(classes)}); add "
                                   f"train/{d.name}/ images or remove the folder")
        for ci, c in enumerate(classes):
            imgs = sorted(f for f in (root / c).glob("*") if f.is_file()) if (root / c).is_dir() else []
            if split == "train" and not [f for f in imgs if f.suffix.lower() in IMAGE_SUFFIXES]:
                raise BadDataError(f"class {c!r} has no training images in {root / c}/; add some or remove the "
                                   "class folder")
            for f in imgs:
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                arr = read_image(f)
                if size is None:
                    size, first = arr.shape[:2], f
                elif arr.shape[:2] != size:
                    raise BadDataError(f"images of different sizes: {first} is {size[1]}x{size[0]} but {f} is "
                                       f"{arr.shape[1]}x{arr.shape[0]} (width x height); zoo does not guess how to "
                                       "resize a mixed set: resize them all to one size first")
                rgb |= arr.ndim == 3
                raw.setdefault(split, []).append((arr, ci))
                lines.append(f"{split}/{c}/{f.name} {hashes[f]}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    splits = {split: (_stack([a for a, _ in items], rgb), np.array([ci for _, ci in items], dtype=np.int64))
              for split, items in raw.items()}
    if rgb and any(a.ndim == 2 for items in raw.values() for a, _ in items):
        print(f"{p}: grayscale and RGB images mixed; reading all as RGB (gray repeated to 3 channels)")
    return _finish(p, "imagefolder", splits, classes, digest, str(p), files=len(lines))


def _stack(images: list[np.ndarray], rgb: bool) -> np.ndarray:
    """``[H, W]`` / ``[H, W, 3]`` images as uint8 ``[N, C, H, W]``: grayscale repeated to 3 channels when ``rgb``."""
    xs = [x if x.ndim == 3 else (np.repeat(x[..., None], 3, -1) if rgb else x[..., None]) for x in images]
    return np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2))


def read_image(f: Path, gray: bool = False) -> np.ndarray:
    """An 8-bit image file as ``[H, W]`` (grayscale, or ``gray``) or ``[H, W, 3]``; a clear error otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise BadDataError(f"{f} is a {im.mode} image (more than 8 bits per pixel); convert it to 8-bit PNG "
                                   "or JPEG")
            return np.asarray(im.convert("L" if gray or im.mode in ("L", "1") else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadDataError(f"{f} cannot be read as an image ({e}); replace or remove it") from None


def _read_seg_tree(p: Path, files: list[Path]) -> PathDataset:
    """``images/`` + ``masks/`` (or per split under ``train/``, ``val/``, ``test/``) with matching file stems."""
    roots = {"train": p} if (p / "masks").is_dir() else {s: p / s for s in ("train", "val", "test")
                                                           if (p / s / "masks").is_dir()}
    hashes = dict(zip(files, (h["sha256"] for h in _files_hashes(files))))
    lines, splits, size, values = [], {}, None, set()
    raw = {}
    for split, root in roots.items():
        if not (root / "images").is_dir():
            raise BadDataError(f"{root} has masks/ but no images/; give images/ and masks/ with matching file names")
        images = {f.stem: f for f in sorted((root / "images").iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
        masks = {f.stem: f for f in sorted((root / "masks").iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
        alone = sorted(set(images) ^ set(masks))
        if alone:
            side = "images/" if alone[0] in images else "masks/"
            raise BadDataError(f"{root / side}{alone[0]}.* has no {'mask' if side == 'images/' else 'image'} of the "
                               f"same name ({len(alone)} unmatched); give every image a mask with the same file name")
        for stem in sorted(images):
            x, m = read_image(images[stem]), read_image(masks[stem], gray=True)
            if x.shape[:2] != m.shape:
                raise BadDataError(f"{masks[stem]} is {m.shape[1]}x{m.shape[0]} but its image {images[stem]} is "
                                   f"{x.shape[1]}x{x.shape[0]}; a mask must have its image's size")
            if size is None:
                size, first = x.shape[:2], images[stem]
            elif x.shape[:2] != size:
                raise BadDataError(f"images of different sizes: {first} is {size[1]}x{size[0]} but {images[stem]} is "
                                   f"{x.shape[1]}x{x.shape[0]}; resize them (and their masks) to one size first")
            values |= set(np.unique(m).tolist())
            raw.setdefault(split, []).append((x, m))
            lines += [f"{split}/images/{images[stem].name} {hashes[images[stem]]}",
                      f"{split}/masks/{masks[stem].name} {hashes[masks[stem]]}"]
    if not raw.get("train"):
        raise BadDataError(f"{p} holds no training image with a mask; give images/ and masks/ (or train/images/, "
                           "train/masks/)")
    binary = values <= {0, 255}
    k = 2 if binary else max(values) + 1
    rgb = any(x.ndim == 3 for items in raw.values() for x, _ in items)
    for split, items in raw.items():
        ms = [(m == 255).astype(np.int64) if binary else m.astype(np.int64) for _, m in items]
        splits[split] = (_stack([x for x, _ in items], rgb), np.stack(ms))
    classes = ("background", "foreground") if binary else tuple(str(i) for i in range(k))
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return _finish(p, "segfolder", splits, classes, digest, str(p), files=len(lines), task="segmentation")


def _finish(p: Path, form: str, splits: dict, classes: tuple[str, ...], digest: str, where: str,
            files: int, task: str = "classification") -> PathDataset:
    """Labels within the classes, every class in train, enough images, no image in two splits; the held-out
    test split when there is none."""
    k = len(classes)
    for split, (_, y) in splits.items():
        bad = np.flatnonzero(((y < 0) | (y >= k)).reshape(len(y), -1).any(1))
        if bad.size:
            what = "mask of image" if task == "segmentation" else "label"
            raise BadDataError(f"{where}: {split} {what} {int(bad[0])} holds {int(y[bad[0]].max())}, outside the {k} "
                               f"classes 0..{k - 1} {list(classes)}; fix the label or the class list")
    counts = np.bincount(splits["train"][1].reshape(-1), minlength=k)
    if task == "classification" and (counts == 0).any():
        c = int(np.flatnonzero(counts == 0)[0])
        raise BadDataError(f"{where}: class {c} ({classes[c]!r}) has no training images (training counts per class "
                           f"{counts.tolist()}); add images of it or renumber the classes")
    minimum = MIN_TRAIN if task == "classification" else MIN_TRAIN_SEGMENTATION
    if len(splits["train"][1]) < minimum:
        raise BadDataError(f"{where}: {len(splits['train'][1])} training images; private training needs at least "
                           f"{minimum} (delta must stay below 1/N, and DP noise swamps so few samples)")
    split_record = None
    if "test" not in splits:
        x, y = splits["train"]
        test = _stratified(y if task == "classification" else np.zeros(len(y), np.int64), TEST_FRACTION,
                           SPLIT_SEED)
        keep = np.setdiff1d(np.arange(len(y)), test)
        splits = {**splits, "train": (x[keep], y[keep]), "test": (x[test], y[test])}
        split_record = {"test": f"held out from train: {'stratified ' if task == 'classification' else ''}"
                                f"{TEST_FRACTION:g}{' of each class' if task == 'classification' else ''}, seed "
                                f"{SPLIT_SEED}"}
        print(f"{where} has no test split: holding out {len(test)} of its {len(y)} training images as the test set "
              f"(stratified {TEST_FRACTION:.0%}, seed {SPLIT_SEED}; recorded in the run's manifest)")
    _refuse_leaks(splits, where)
    return PathDataset(p, form, splits, classes, digest, split_record, files, task)


def _stratified(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = [rng.choice(idx, max(1, round(fraction * len(idx))) if len(idx) > 1 else 0, replace=False)
           for idx in (np.flatnonzero(y == c) for c in np.unique(y))]
    return np.sort(np.concatenate(out)).astype(np.int64)


def _refuse_leaks(splits: dict, where: str) -> None:
    """The same image bytes in train and in val or test: the evaluation would flatter the model (and test
    images would be training data the ledger does not count). Refused, naming the first pair."""
    seen = {hashlib.blake2b(x.tobytes(), digest_size=16).digest(): i for i, x in enumerate(splits["train"][0])}
    for split in ("val", "test"):
        if split not in splits:
            continue
        for j, x in enumerate(splits[split][0]):
            i = seen.get(hashlib.blake2b(x.tobytes(), digest_size=16).digest())
            if i is not None:
                raise BadDataError(f"{where}: {split} image {j} is identical to train image {i} (a leak between "
                                   f"the splits); remove one of them. Duplicates within a split are allowed")


def describe(ds: PathDataset) -> str:
    """One line for the user: form, classes, images per split, size."""
    m = ds.manifest
    return (f"{m['form']} {m['path'] or ds.name}: {len(m['classes'])} classes {m['classes'][:6]}"
            f"{'...' if len(m['classes']) > 6 else ''}, {m['channels']}x{m['size'][0]}x{m['size'][1]}, images "
            + json.dumps(m["images"]))
