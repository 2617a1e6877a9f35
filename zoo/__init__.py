"""zoo: the model zoo for differentially private (DP-SGD) computer vision.

Public surface (like timm's): ``list_models``, ``create_model``, ``model_info``, plus the DP contract
``per_sample_gradients`` and the training entry points ``train`` and ``finetune``.
"""
from . import models as _families  # noqa: F401  (registers the architecture families)
from .eq_layers import export
from .grad_sample import per_sample_gradients
from .registry import create_model, list_models, load_cards, model_info, register_model
from .sparse import prune
from .validate import validate_model

__version__ = "0.1.0"

load_cards()

__all__ = ["list_models", "create_model", "model_info", "register_model", "per_sample_gradients",
           "validate_model", "export", "prune", "train", "finetune", "__version__"]


def __getattr__(name):  # the engine imports the data stack; load it only when asked for
    if name in ("train", "finetune", "evaluate"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
