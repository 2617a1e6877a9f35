"""Data sets for the zoo: locating, verifying, caching and batching image data.

Contract:
  * The *data root* (``--data-dir`` / ``ZOO_DATA``) is only ever read; it may be read-only.
  * Everything derived from it (extracted archives, decoded arrays, hash results, downloads)
    goes into the *cache root* (``ZOO_CACHE``, default ``~/.cache/zoo``).
  * Archives are hash-verified before use; unknown bytes raise :class:`DataIntegrityError`.
  * Loaders return an :class:`ImageDataset`: uint8 images ``[N,C,H,W]`` and int64 labels ``[N]``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Literal, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from zoo.io import PATH_FORMS, atomic_write, cache_root, file_hashes, save_npy, write_text  # noqa: F401 (PATH_FORMS: zoo.data's)
from zoo.registrar import instance_registrar

Split = Literal["train", "val", "test"]
_ENV_HELP = "pass --data-dir DIR or set the ZOO_DATA environment variable"


class DataNotFoundError(FileNotFoundError):
    """Data (or the data root itself) is missing; the message names what was expected where."""


class DataIntegrityError(ValueError):
    """A data file exists but its contents do not match any known hash."""


class UnknownDatasetError(KeyError):
    """No data set is registered under the requested name (message lists close matches)."""

    def __str__(self) -> str:
        return str(self.args[0])


def data_root(data_dir: str | Path | None = None) -> Path:
    """Return ``data_dir`` if given, else ``$ZOO_DATA``; raise :class:`DataNotFoundError` if neither."""
    value = data_dir if data_dir is not None else (os.environ.get("ZOO_DATA") or None)
    if value is None:
        raise DataNotFoundError(f"no data root configured: {_ENV_HELP} (the folder holding e.g. cifar10/)")
    return Path(value).expanduser()


# ----------------------------------------------------------------------------- registry
class DatasetInfo:
    """Static description of a data set plus its loader. Subclass, set the attributes, decorate."""

    name: str = ""
    task: str = "classification"  # what is predicted: a name registered in zoo.data.tasks
    num_classes: int
    in_chans: int
    image_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def load(self, split: Split = "train", data_dir: str | Path | None = None,
             download: bool = False) -> "ImageDataset":
        """Return the whole ``split`` in memory; raise DataNotFoundError / DataIntegrityError."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, image_size={self.image_size})"


_REGISTRY: dict[str, DatasetInfo] = {}
_T = TypeVar("_T", bound=type)
_D = TypeVar("_D")


_register_dataset = instance_registrar(_REGISTRY, "dataset")


def register_dataset(name: str) -> Callable[[_T], _T]:
    """Class decorator: register an instance of a :class:`DatasetInfo` subclass under ``name``. Its attributes are
    checked first (:func:`check_info`), so that a wrong one is named here rather than blamed on the images later.
    For data in files, a path needs no registration (:mod:`zoo.data.folder`)."""
    register = _register_dataset(name)

    def deco(cls: _T) -> _T:
        if name not in _REGISTRY:  # a second registration of a name is refused by the registrar itself
            check_info(cls, name)
        return register(cls)

    return deco


def check_info(cls, name: str) -> None:
    """A :class:`DatasetInfo` class's attributes, else ``TypeError``/``ValueError`` naming the attribute: int
    ``num_classes`` >= 2 and ``in_chans`` >= 1; ``image_size`` (C, H, W) with C = ``in_chans``; ``mean`` and
    ``std`` one finite number per channel (numpy numbers are converted to float), std > 0; ``classes``, when
    given, one name per class."""
    where = f"data set {name!r} ({cls.__name__})"
    for attr, low in (("num_classes", 2), ("in_chans", 1)):
        v = getattr(cls, attr, None)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise TypeError(f"{where}: {attr} must be an int >= {low}, got {v!r}")
        setattr(cls, attr, int(v))
    size = tuple(int(v) for v in getattr(cls, "image_size", ()))
    if len(size) != 3 or size[0] != cls.in_chans or min(size) < 1:
        raise ValueError(f"{where}: image_size must be (in_chans={cls.in_chans}, H, W), got "
                         f"{getattr(cls, 'image_size', None)!r}")
    cls.image_size = size
    for attr in ("mean", "std"):
        v = getattr(cls, attr, None)
        try:
            values = tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise TypeError(f"{where}: {attr} must be a sequence of {cls.in_chans} numbers (one per channel), got "
                            f"{v!r}") from None
        if len(values) != cls.in_chans or not all(np.isfinite(values)) or (attr == "std" and min(values) <= 0):
            raise ValueError(f"{where}: {attr} must hold {cls.in_chans} finite number(s)"
                             + (" > 0" if attr == "std" else "") + f", one per channel; got {values}")
        setattr(cls, attr, values)
    classes = getattr(cls, "classes", None)
    if classes and len(classes) != cls.num_classes:
        raise ValueError(f"{where}: classes names {len(classes)} classes but num_classes is {cls.num_classes}")


def list_datasets() -> list[str]:
    """Names of all registered data sets, sorted."""
    return sorted(_REGISTRY)


def registered(name: str) -> DatasetInfo | None:
    """The :class:`DatasetInfo` registered as ``name``, else ``None`` (:func:`zoo.data.get_dataset_info` also reads
    paths and suggests close names)."""
    return _REGISTRY.get(name)


def add_dataset(info: DatasetInfo) -> None:
    """Register an already built data set (in-memory arrays, :func:`zoo.data.from_arrays`) under ``info.name``;
    another data set of that name is refused unless its manifest's sha256 is the same."""
    old = _REGISTRY.get(info.name)
    if old is not None and getattr(old, "manifest", {}).get("sha256") != info.manifest["sha256"]:
        raise ValueError(f"a data set named {info.name!r} is already registered with other content; pick another "
                         "name")
    _REGISTRY[info.name] = info


# ----------------------------------------------------------------------------- caching helpers
def _files_hashes(paths: Sequence[Path]) -> list[dict[str, str]]:
    """sha256 and md5 of each of ``paths``, cached in the cache root keyed by (path, size, mtime). The cache is
    read once and written at most once per call, however many files (a data set of 656 images is one call)."""
    keys = [f"{p.resolve()}|{(st := p.stat()).st_size}|{st.st_mtime_ns}" for p in paths]
    db_path = cache_root() / "data" / "verified.json"
    try:
        db = json.loads(db_path.read_text())
    except (OSError, ValueError):
        db = {}
    new = {k: file_hashes(p, "sha256", "md5") for p, k in zip(paths, keys) if k not in db}
    if new:
        db.update(new)
        write_text(db_path, json.dumps(db, indent=1))
    return [db[k] for k in keys]


def _file_hashes(path: Path) -> dict[str, str]:
    """:func:`_files_hashes` of one file."""
    return _files_hashes([path])[0]


def _extract_once(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` atomically (temp dir + os.replace); reuse if present."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(tmp, dest)
    except OSError:
        if not dest.is_dir():  # a concurrent extraction winning the race is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _cached_arrays(folder: Path, split: str, make: Callable[[], tuple[np.ndarray, np.ndarray]],
                   wrap: Callable[[torch.Tensor, torch.Tensor], _D]) -> _D:
    """``wrap(images, targets)`` of ``<folder>/<split>_{images,labels}.npy`` (allow_pickle=False), building the
    files once via ``make`` (which reads the verified source).

    The cache is derived data, so a cached file that cannot be read (truncated, corrupt, a pickle) or whose
    arrays ``wrap`` refuses (wrong shape or dtype, labels out of range: ``wrap`` raises ``ValueError``) is
    rebuilt from the source, with a warning naming it; a source that still fails raises."""
    xp, yp = folder / f"{split}_images.npy", folder / f"{split}_labels.npy"

    def build() -> None:
        x, y = make()
        for path, arr in ((yp, y), (xp, x)):
            atomic_write(path, lambda tmp, arr=arr: save_npy(tmp, arr))

    def read() -> _D:
        x, y = np.load(xp, allow_pickle=False), np.load(yp, allow_pickle=False)
        return wrap(torch.from_numpy(x), torch.from_numpy(y))

    if xp.is_file() and yp.is_file():
        try:
            return read()
        except (OSError, ValueError, EOFError) as e:
            warnings.warn(f"the cached arrays {xp.name}/{yp.name} in {folder} are unreadable or invalid ({e}); "
                          "rebuilding them from the verified source", stacklevel=3)
    build()
    return read()


# ----------------------------------------------------------------------------- in-memory data
LUMA = torch.tensor([0.299, 0.587, 0.114])
"""ITU-R BT.601 luma weights: RGB to gray for a 1-channel model (they sum to 1)."""


class ArrayDataset:
    """In-memory uint8 images ``[N,C,H,W]`` with one target per image (``targets``) and their
    :class:`DatasetInfo`. ``ds[i]`` returns ``(uint8 image(s), target(s))`` like a TensorDataset; :meth:`batch`
    returns float32 images normalised with ``info.mean``/``info.std`` and the targets."""

    images: torch.Tensor
    targets: torch.Tensor
    info: DatasetInfo
    channels: int | None = None  # set by with_channels: batch() repeats grayscale images to this many channels

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    def batch(self, indices: Sequence[int] | torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(float32 images normalised with info.mean/std, targets)`` for ``indices``."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        mean = torch.tensor(self.info.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std).view(1, -1, 1, 1)
        x = (self.images[indices].float().div_(255) - mean) / std
        if self.channels == 1 and x.shape[1] == 3:  # RGB to gray: ITU-R BT.601 luma of the normalised channels
            x = (x * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif self.channels:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x, self.targets[indices]

    def with_channels(self, channels: int) -> "ArrayDataset":
        """This data as a model with ``channels`` input channels takes it: grayscale images are repeated to
        ``channels`` channels by :meth:`batch` (after normalisation), and RGB images become their ITU-R BT.601 luma
        (:data:`LUMA`, after normalisation) for a 1-channel model. For a model pretrained on RGB this equals
        summing its first layer's filters over the input channels (timm's ``adapt_input_conv``), and it holds for
        every first layer, including weight-standardized and equivariant ones, because the model is unchanged."""
        have = self.images.shape[1]
        if channels == have:
            return self
        if have != 1 and not (have == 3 and channels == 1):
            raise ValueError(f"{self.info.name} has {have}-channel images; a model with {channels} input channels "
                             "cannot take them (grayscale images are repeated to more channels, and RGB images "
                             "converted to gray for a 1-channel model)")
        new = copy.copy(self)
        new.channels = channels
        return new


class ImageDataset(ArrayDataset):
    """Classification data: images (uint8 ``[N,C,H,W]``) and labels (int64 ``[N]``, also ``targets``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != info.in_chans:
            raise ValueError(f"images must be uint8 [N,{info.in_chans},H,W], got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 [{len(images)}], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
            raise ValueError(f"labels must lie in [0, {info.num_classes}) ({info.name}: {info.num_classes} classes), "
                             f"got min {int(labels.min())}, max {int(labels.max())}")
        self.images, self.targets, self.info = images, labels, info

    @property
    def labels(self) -> torch.Tensor:
        return self.targets

    def resized(self, size: int) -> "ImageDataset":
        """A new data set with the images resized to ``size x size``: bilinear with antialiasing (area-weighted when
        shrinking), rounded back to uint8. E.g. 28x28 X-rays to 32x32 for a model whose equivariance needs sizes
        divisible by 8. ``info`` is shared (its ``image_size`` keeps the stored size)."""
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        x = torch.nn.functional.interpolate(self.images.float(), size=(int(size), int(size)), mode="bilinear",
                                            align_corners=False, antialias=True)
        new = copy.copy(self)
        new.images = x.round_().clamp_(0, 255).to(torch.uint8)
        return new

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """Class-stratified random subset of exactly ``n`` samples, deterministic given ``seed``.

        Each class gets ``n * count_c / N`` samples rounded by largest remainder (ties: lower class
        index); samples keep their original relative order.
        """
        if not 0 < n <= len(self):
            raise ValueError(f"n must be in [1, {len(self)}], got {n}")
        labels = self.labels.numpy()
        classes, counts = np.unique(labels, return_counts=True)
        quota = counts * n / len(labels)
        take = np.floor(quota).astype(np.int64)
        take[np.argsort(-(quota - take), kind="stable")[: n - take.sum()]] += 1
        rng = np.random.default_rng(seed)
        idx = np.sort(np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]))
        t = torch.from_numpy(idx)
        return ImageDataset(self.images[t], self.labels[t], self.info)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (reflect padding ``padding``) + random horizontal flip, independently per sample.

    ``images``: float ``[B,C,H,W]`` (any device). For each sample a crop offset in
    ``[0, 2*padding]^2`` and a flip bit (p=0.5) are drawn from ``generator`` (on its device),
    so results are deterministic given the generator state. Vectorised: one gather, no loop.
    Returns a new tensor of the same shape, dtype and device.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"augment expects a float [B,C,H,W] tensor, got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    offs = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=generator.device)
    flip = torch.rand(b, generator=generator, device=generator.device) < 0.5
    offs, flip = offs.to(images.device), flip.to(images.device)
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    ar_h, ar_w = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    rows = offs[:, :1] + ar_h  # [B,H]
    cols = offs[:, 1:] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # [B,W]
    bi = torch.arange(b, device=images.device)[:, None, None]
    return padded[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- input preparation of a checkpoint
def preparation(info: DatasetInfo, recipe: dict, in_chans: int) -> dict:
    """How an image must be prepared for a model trained on ``info`` with ``recipe`` (the ``preparation`` block of
    a checkpoint's sidecar, timm's ``pretrained_cfg``): 8-bit pixels divided by 255, resized to ``input_size``
    (when the run resized: bilinear with antialiasing, as :meth:`ImageDataset.resized`), normalised per channel of
    the *data* with ``mean``/``std``, then a single channel repeated to the model's ``in_chans``, or three
    channels combined to their luma for a 1-channel model (``channel_conversion``, :meth:`ArrayDataset.with_channels`).
    :func:`prepare_input` applies it."""
    size = recipe.get("resize")
    h, w = (int(size), int(size)) if size else tuple(info.image_size[1:])
    return {"input_size": [int(in_chans), h, w], "data_channels": int(info.in_chans),
            "channel_conversion": "none" if in_chans == info.in_chans else (
                "luma" if in_chans == 1 and info.in_chans == 3 else "repeat"),
            "pixel_scale": "uint8 / 255", "resize": None if not size else {"size": [h, w], "mode": "bilinear",
                                                                           "antialias": True},
            "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std],
            "normalisation_source": getattr(info, "normalisation_source", None)
            or f"{info.name} (the data set the model was trained on)",
            "dataset": info.name, "task": info.task, "num_classes": int(info.num_classes),
            "classes": list(getattr(info, "classes", ()) or ())}


def prepare_input(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Raw images ``[N, H, W]``, ``[N, C, H, W]`` (uint8 0-255, or float in [0, 1]) prepared as ``cfg`` (a
    checkpoint's ``preparation``, ``model.pretrained_cfg``) says: the float32 ``[N, *input_size]`` batch the
    model takes. Segmentation models take any size that is a multiple of theirs; classifiers get the image
    resized to ``input_size`` (printed nowhere: pass images of that size to avoid it)."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    elif x.is_floating_point():
        if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
            raise ValueError("float images must hold values in [0, 1] (or pass uint8 0-255)")
        x = x.float()
    else:
        raise TypeError(f"images must be uint8 or float, got {x.dtype}")
    c = cfg["data_channels"]
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:  # RGB to gray: ITU-R BT.601 luma
            x = (x * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.repeat(1, c, 1, 1)
        else:
            raise ValueError(f"images have {x.shape[1]} channels; this model was trained on {c}-channel data")
    h, w = cfg["input_size"][1:]
    if cfg["task"] == "classification" and tuple(x.shape[-2:]) != (h, w):  # a segmenter keeps the image's size
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(cfg["mean"]).view(1, -1, 1, 1)) / torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    if cfg["input_size"][0] != c:
        if cfg.get("channel_conversion") == "luma":  # an RGB data set, a 1-channel model: as ArrayDataset.batch
            x = (x * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            x = x.repeat(1, cfg["input_size"][0] // c, 1, 1)
    return x

