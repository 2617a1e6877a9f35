"""The registered image-classification data sets: CIFAR-10 and PneumoniaMNIST (hash-verified files in the data
root, decoded once into the cache root)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zoo.data.base import (_ENV_HELP, DataIntegrityError, DataNotFoundError, DatasetInfo, ImageDataset, Split,
                           _cached_arrays, _extract_once, _file_hashes, data_root, register_dataset)
from zoo.io import cache_root

# ----------------------------------------------------------------------------- CIFAR-10
_CIFAR_TGZ = "cifar-10-python.tar.gz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_MD5_OFFICIAL = "c58f30108f718f92721af3b95e74349a"  # torchvision's CIFAR10.tgz_md5
_CIFAR_SHA256_REPACK = "fa63b5271be78a7c12aac2475fbab5d47b694d77aec06cc41e9772bcf9c66c42"  # shared re-pack


def _read_cifar(root: Path, train: bool, verified: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode CIFAR-10 batches under ``root/cifar-10-batches-py`` through torchvision's reader.

    torchvision's own md5 check is replaced by ``verified`` (our sha256/md5 check of the source);
    the ``batches.meta`` md5 check of torchvision still applies.
    """
    from torchvision.datasets import CIFAR10

    class _VerifiedCIFAR10(CIFAR10):
        def _check_integrity(self) -> bool:
            files = [n for n, _ in self.train_list + self.test_list]
            return verified and all((Path(self.root) / self.base_folder / n).is_file() for n in files)

    ds = _VerifiedCIFAR10(str(root), train=train, download=False)
    images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2), dtype=np.uint8)
    return images, np.asarray(ds.targets, dtype=np.int64)


def _official_batches_ok(folder: Path) -> bool:
    """torchvision's md5 check of an extracted official ``cifar-10-batches-py`` (hashes cached)."""
    from torchvision.datasets import CIFAR10

    files = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return all((folder / n).is_file() and _file_hashes(folder / n)["md5"] == md5 for n, md5 in files)


@register_dataset("cifar10")
class CIFAR10Info(DatasetInfo):
    """CIFAR-10: 50,000 train / 10,000 test RGB 32x32 images, 10 classes.

    Looks for ``<root>/cifar10/cifar-10-python.tar.gz`` (official archive by md5, or the lossless
    re-pack by sha256), else an extracted official ``<root>/cifar10/cifar-10-batches-py/`` or
    ``<root>/cifar-10-batches-py/`` passing torchvision's md5 check, else a previous download in the
    cache. Archives are extracted to ``<cache>/data/cifar10/<sha256[:16]>/``; decoded arrays are
    cached next to them as ``.npy`` files.
    """

    num_classes, in_chans, image_size = 10, 3, (3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def load(self, split: Split = "train", data_dir: str | Path | None = None,
             download: bool = False) -> "ImageDataset":
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        cache = cache_root() / "data" / "cifar10"
        downloaded = cache_root() / "downloads" / "cifar10" / _CIFAR_TGZ
        try:
            root: Path | None = data_root(data_dir)
        except DataNotFoundError:
            if not (download or downloaded.is_file()):
                raise
            root = None
        archives = [root / "cifar10" / _CIFAR_TGZ] if root else []
        folders = [root / "cifar10" / _CIFAR_DIR, root / _CIFAR_DIR] if root else []
        archive = next((p for p in archives + [downloaded] if p.is_file()), None)
        folder = next((p for p in folders if p.is_dir()), None)
        if archive is None and folder is None and download:
            from torchvision.datasets import CIFAR10
            from torchvision.datasets.utils import download_url

            download_url(CIFAR10.url, str(downloaded.parent), _CIFAR_TGZ, _CIFAR_MD5_OFFICIAL)
            archive = downloaded
        if archive is not None:
            h = _file_hashes(archive)
            if h["sha256"] != _CIFAR_SHA256_REPACK and h["md5"] != _CIFAR_MD5_OFFICIAL:
                raise DataIntegrityError(
                    f"{archive} is not a known CIFAR-10 archive: sha256 {h['sha256']}, md5 {h['md5']}; "
                    f"expected md5 {_CIFAR_MD5_OFFICIAL} (official) or sha256 {_CIFAR_SHA256_REPACK} "
                    "(lossless re-pack). The file is probably truncated or corrupted: replace it with "
                    "a fresh copy (or delete it and use --download with network access).")
            extracted = _extract_once(archive, cache / h["sha256"][:16])
            return _cached_arrays(extracted, split, lambda: _read_cifar(extracted, split == "train", True),
                                  lambda x, y: ImageDataset(x, y, self))
        elif folder is not None:
            if not _official_batches_ok(folder):
                raise DataIntegrityError(
                    f"{folder} does not pass torchvision's md5 check of the official CIFAR-10 batches; "
                    f"provide the archive {folders[0].parent / _CIFAR_TGZ} instead (official or re-pack).")
            out = cache / "official-batches"
            return _cached_arrays(out, split, lambda: _read_cifar(folder.parent, split == "train", True),
                                  lambda x, y: ImageDataset(x, y, self))
        else:
            where = f"{root / 'cifar10' / _CIFAR_TGZ} or an extracted {folders[0]}/ (or {folders[1]}/)"
            raise DataNotFoundError(
                f"CIFAR-10 not found: expected {where}"
                + ("" if root.is_dir() else f" (the data root {root} does not exist)")
                + f". Fix: {_ENV_HELP} pointing at a folder with cifar10/{_CIFAR_TGZ}, "
                "or use --download (needs network access).")


# ----------------------------------------------------------------------------- PneumoniaMNIST
_PNEUMONIA_NPZ = "pneumoniamnist.npz"
_PNEUMONIA_MD5 = "28209eda62fecd6e6a2d98b1501bb15f"  # medmnist 3.0.2: INFO["pneumoniamnist"]["MD5"]


@register_dataset("pneumoniamnist")
class PneumoniaMNISTInfo(DatasetInfo):
    """PneumoniaMNIST (MedMNIST v2, Yang et al. 2023): pediatric chest X-rays (Kermany et al. 2018) at 28x28,
    grayscale, normal vs pneumonia; 4,708 train / 524 val / 624 test images, MedMNIST's shipped split (train:
    1,214 normal, 3,494 pneumonia; test: 234 normal, 390 pneumonia: imbalanced, so the classification metrics
    include balanced accuracy and ROC-AUC). Looks for ``<root>/pneumonia/pneumoniamnist.npz`` or ``<root>/pneumoniamnist/...``, the official
    file checked by medmnist's md5; read with ``allow_pickle=False``. Normalisation constants: train-split
    mean and std of the pixel values in [0, 1].
    """

    num_classes, in_chans, image_size = 2, 1, (1, 28, 28)
    mean, std = (0.5719,), (0.1684,)
    classes = ("normal", "pneumonia")

    def load(self, split: Split = "train", data_dir: str | Path | None = None,
             download: bool = False) -> "ImageDataset":
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        root = data_root(data_dir)
        candidates = [root / "pneumonia" / _PNEUMONIA_NPZ, root / "pneumoniamnist" / _PNEUMONIA_NPZ]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataNotFoundError(
                f"PneumoniaMNIST not found: expected {candidates[0]} (or {candidates[1]}). Fix: {_ENV_HELP} "
                "pointing at a folder with pneumonia/pneumoniamnist.npz (MedMNIST's official file); zoo does not "
                "download it.")
        md5 = _file_hashes(path)["md5"]
        if md5 != _PNEUMONIA_MD5:
            raise DataIntegrityError(f"{path} has md5 {md5}, not the official PneumoniaMNIST {_PNEUMONIA_MD5}; "
                                     "the file is probably truncated or corrupted: replace it with a fresh copy")
        with np.load(path, allow_pickle=False) as z:
            x = torch.from_numpy(np.ascontiguousarray(z[f"{split}_images"][:, None]))
            y = torch.from_numpy(z[f"{split}_labels"].reshape(-1).astype(np.int64))
        return ImageDataset(x, y, self)
