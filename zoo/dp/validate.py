"""Refuse models that would leak: batch statistics, running buffers, or trainable layers without exact
per-sample gradients.

DP-SGD bounds each sample's influence by clipping its own gradient. That bound holds only if (1) a sample's
output does not depend on other samples (no batch statistics), (2) no data-dependent state escapes outside
the clipped gradient (no running buffers updated from data), and (3) every trainable parameter gets an exact
per-sample gradient (a parameter updated from an unclipped batch gradient is unbounded).
"""
from __future__ import annotations

import sys

from opacus.grad_sample import GradSampleModule
from torch import nn


class DPCompatibilityError(ValueError):
    """Base class: the model cannot be trained with a valid DP-SGD guarantee. ``problems`` lists all."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class BatchStatisticsError(DPCompatibilityError):
    """A layer normalizes with statistics over the batch (BatchNorm): samples leak into each other."""


class RunningBufferError(DPCompatibilityError):
    """A layer keeps running statistics of the data in buffers, outside any clipping or noise."""


class NoPerSampleGradientError(DPCompatibilityError):
    """A trainable layer has no registered exact per-sample gradient computation."""


_FIX = "use zoo.nn.layers.get_norm_layer('groupnorm') (per-sample statistics) instead"


def _batch_norm_classes() -> tuple[type, ...]:
    classes: list[type] = [nn.modules.batchnorm._BatchNorm]
    escnn_nn = sys.modules.get("escnn.nn")  # only models built from escnn can contain its layers
    if escnn_nn is not None:
        for name in ("InnerBatchNorm", "NormBatchNorm", "InducedNormBatchNorm", "GNormBatchNorm",
                     "IIDBatchNorm1d", "IIDBatchNorm2d", "IIDBatchNorm3d"):
            if hasattr(escnn_nn, name):
                classes.append(getattr(escnn_nn, name))
    return tuple(classes)


def find_problems(model: nn.Module) -> list[DPCompatibilityError]:
    """Every DP problem of ``model``, one typed error each (empty list: the model is DP-safe)."""
    problems: list[DPCompatibilityError] = []
    bn = _batch_norm_classes()
    for name, module in model.named_modules():
        where = name or type(model).__name__
        kind = type(module).__name__
        if isinstance(module, bn):
            problems.append(BatchStatisticsError(
                f"{where} ({kind}) normalizes with mean and variance over the batch, so one sample's output "
                f"depends on every other sample and clipping no longer bounds its influence; {_FIX}"))
            continue
        running = [b for b, _ in module.named_buffers(recurse=False)
                   if b.startswith("running_") or b == "num_batches_tracked"]
        if running:
            problems.append(RunningBufferError(
                f"{where} ({kind}) keeps running statistics {running} computed from the data; they are "
                f"released with the model without clipping or noise; {_FIX} or set track_running_stats=False"))
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            problems.append(NoPerSampleGradientError(
                f"{where} ({kind}) has trainable parameters but no exact per-sample gradient is registered for "
                f"{kind}; register one with opacus.grad_sample.register_grad_sampler({kind}) or freeze it "
                "(requires_grad_(False))"))
    return problems


def validate_model(model: nn.Module) -> nn.Module:
    """Return ``model`` if DP-safe; else raise the first problem's typed error, listing all problems."""
    problems = find_problems(model)
    if problems:
        first = problems[0]
        msg = "model is not DP-safe:\n  - " + "\n  - ".join(str(p) for p in problems)
        raise type(first)(msg, [str(p) for p in problems])
    return model
