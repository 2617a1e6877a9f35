"""File helpers shared by checkpoints, data caches and run results: the cache root, atomic writes and file hashes,
and the forms of data files zoo reads (:data:`PATH_FORMS`).

The ground floor of zoo: imports nothing of zoo."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

PATH_FORMS = ("a MedMNIST-style .npz file (train_images, train_labels, optional val_*/test_*), an ImageFolder tree "
              "(train/<class>/*.png|jpg, optional val/ and test/), or for segmentation images/ + masks/ with "
              "matching file names")
"""What a recipe's ``dataset`` may name besides a registered data set: a path to data of these forms
(:mod:`zoo.data.folder`); for help texts and errors. Here, on the ground floor, so that ``zoo --help`` names
them without importing the data stack."""


def cache_root() -> Path:
    """zoo's cache folder (decoded data sets, escnn's stores): ``$ZOO_CACHE`` if set, else ``~/.cache/zoo`` (not
    created here)."""
    return Path(os.environ.get("ZOO_CACHE") or Path.home() / ".cache" / "zoo").expanduser()


def atomic_write(dest: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``dest``, fsync it and rename it over ``dest``.

    Readers see the old file or the complete new one, never a partial write; on any error the temporary
    file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions a plain open() would
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_npy(path: str | Path, arr) -> None:
    """``np.save`` without pickles, through a file object (``np.save`` would append ``.npy`` to a path)."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def write_text(dest: str | Path, text: str) -> None:
    atomic_write(dest, lambda tmp: Path(tmp).write_text(text))


def file_hashes(path: str | Path, *algorithms: str, chunk: int = 1 << 20) -> dict[str, str]:
    """Hex digests of ``path`` for each hashlib algorithm (one pass over the file)."""
    hs = {a: hashlib.new(a, usedforsecurity=False) if a == "md5" else hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hs.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hs.items()}


def sha256_file(path: str | Path) -> str:
    return file_hashes(path, "sha256")["sha256"]
