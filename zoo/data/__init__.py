"""Data sets: locating, verifying, caching and batching image data, and the tasks that read them.

The package, bottom to top (a module imports only from those below it; ``lint-imports`` checks it):

* :mod:`zoo.data.base`: the data root and cache root contract, :class:`DatasetInfo` and its registry, the
  in-memory :class:`ArrayDataset` / :class:`ImageDataset`, augmentation, and the input preparation a checkpoint
  records (:func:`preparation`, :func:`prepare_input`);
* :mod:`zoo.data.images`: the registered classification data sets (CIFAR-10, PneumoniaMNIST);
* :mod:`zoo.data.segmentation`: the registered segmentation data sets (ISBI 2012, Weizmann horses);
* :mod:`zoo.data.folder`: the user's own data, given by path or as arrays (no registration);
* :mod:`zoo.data.tasks`: classification and segmentation: views, scores, evaluation (their batch checks and
  per-sample losses are :mod:`zoo.dp.objectives`).

This module is the package's face: it registers the data sets by importing them, and resolves a recipe's
``dataset`` (:func:`get_dataset_info`: a registered name, else a path).
"""
from __future__ import annotations

import difflib

from zoo.data import images, segmentation  # noqa: F401  (register the data sets)
from zoo.data.base import (LUMA, PATH_FORMS, ArrayDataset, DataIntegrityError, DataNotFoundError, DatasetInfo,
                           ImageDataset, Split, UnknownDatasetError, augment, data_root, list_datasets,
                           preparation, prepare_input, register_dataset, registered)
from zoo.data.folder import BadDataError, from_arrays, from_path, looks_like_path, read_image

__all__ = ["LUMA", "PATH_FORMS", "ArrayDataset", "BadDataError", "DataIntegrityError", "DataNotFoundError",
           "DatasetInfo", "ImageDataset", "Split", "UnknownDatasetError", "augment", "data_root", "from_arrays",
           "from_path", "get_dataset_info", "list_datasets", "preparation", "prepare_input", "read_image",
           "register_dataset", "registered"]


def get_dataset_info(name: str) -> DatasetInfo:
    """The registered :class:`DatasetInfo` of ``name``, or the data at ``name`` when it is a path
    (:func:`zoo.data.folder.from_path`); unknown names raise :class:`UnknownDatasetError`."""
    info = registered(name)
    if info is not None:
        return info
    if looks_like_path(name):
        return from_path(name)
    close = difflib.get_close_matches(name.lower(), list_datasets(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownDatasetError(f"unknown dataset {name!r}.{hint} Available: {', '.join(list_datasets())}, or a path: "
                              f"{PATH_FORMS}")
