"""zoo: the model zoo for differentially private (DP-SGD) computer vision.

Public surface (like timm's): ``list_models``, ``create_model``, ``model_info``, plus the DP contract
``per_sample_gradients``, the training entry points ``train`` and ``finetune``, and ``segment`` (masks for a user's
images of any size).

``import zoo`` reads the model cards and nothing else: torch, opacus, escnn and the data stack are imported when
a name that needs them is first used (``zoo.create_model``, ``zoo.train``, ...), so that ``zoo list`` and
``zoo --help`` answer at once.
"""
from importlib import import_module

from zoo.catalog.registry import create_model, list_models, load_cards, model_info, register_model

__version__ = "0.1.0"

load_cards()

_LAZY = {"per_sample_gradients": "zoo.dp.grad_sample", "validate_model": "zoo.dp.validate",
         "export": "zoo.nn.equivariant", "prune": "zoo.nn.sparse", "train": "zoo.training.engine",
         "finetune": "zoo.training.engine", "evaluate": "zoo.training.engine", "segment": "zoo.predict"}
"""Public names of zoo -> the module that defines them, imported on first access."""

__all__ = ["list_models", "create_model", "model_info", "register_model", "per_sample_gradients",
           "validate_model", "export", "prune", "train", "finetune", "segment", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
