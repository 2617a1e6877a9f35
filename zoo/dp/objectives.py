"""Per-sample objectives: for each kind of prediction, the check of a training batch and the loss per sample.

The ground floor under the per-sample gradients (:mod:`zoo.dp.grad_sample`, which takes a model's default loss from
here by its ``task`` name) and the tasks (:mod:`zoo.data.tasks`, which add views, scores and evaluation): both read the
one definition. Imports only torch and the models' input contract (:mod:`zoo.nn.inputs`).

DP contract of every objective: ``loss(outputs, targets)`` returns one loss per sample, computed from that sample's
outputs and targets only, so the gradient of entry i is sample i's gradient.

* ``classification``: outputs ``[B, K]`` logits, targets int64 labels ``[B]``; cross-entropy.
* ``segmentation``: outputs ``[B, K, H, W]`` per-pixel logits, targets int64 masks ``[B, H, W]``; the mean
  per-pixel cross-entropy of the sample + (1 - its soft Dice averaged over the classes).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from zoo.nn.inputs import check_images


def check_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, in_chans: int, per_pixel: bool = False
                ) -> None:
    """Validate a training batch; raise TypeError (wrong types/dtypes) or ValueError (shapes/values).

    Requires: x float ``[B,in_chans,H,W]`` and finite (:func:`zoo.nn.inputs.check_images`, the models' own input
    contract); y int64 with values in ``[0, num_classes)``: labels ``[B]``,
    or with ``per_pixel=True`` segmentation masks ``[B,H,W]`` matching x.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
    check_images(x, in_chans)
    what = "masks" if per_pixel else "labels y"
    if y.dtype != torch.int64:
        raise TypeError(f"{what} must be int64 class indices{' per pixel' * per_pixel}, got {y.dtype} "
                        "(use y.long())")
    if per_pixel and tuple(y.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"masks must be [B,H,W] = {(x.shape[0], *x.shape[2:])} to match the images, "
                         f"got {tuple(y.shape)}")
    if not per_pixel and (y.ndim != 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"batch size mismatch: x has {x.shape[0]} samples, y has shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{what} out of range [0, {num_classes}): min {int(y.min())}, max {int(y.max())}")


def per_sample_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, shape ``[B]`` (the classification loss)."""
    return F.cross_entropy(logits, targets, reduction="none")


def dice_ce_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-sample Dice + cross-entropy ``[B]``: for sample i, the mean over its pixels of the cross-entropy plus
    ``1 - mean_c (2 sum p_c t_c + s) / (sum p_c + sum t_c + s)`` with softmax probabilities p, one-hot masks t,
    sums over that sample's pixels only and ``s = smooth`` (which makes a class absent from both 1)."""
    ce = F.cross_entropy(logits, masks, reduction="none").flatten(1).mean(1)
    probs = logits.softmax(1)
    classes = torch.arange(logits.shape[1], device=masks.device).view(1, -1, 1, 1)
    onehot = (masks.unsqueeze(1) == classes).to(probs.dtype)  # F.one_hot checks values: not vmap-able
    inter = (probs * onehot).flatten(2).sum(2)
    total = probs.flatten(2).sum(2) + onehot.flatten(2).sum(2)
    dice = (2 * inter + smooth) / (total + smooth)
    return ce + 1 - dice.mean(1)


class Objective(NamedTuple):
    """``check(x, y, num_classes, in_chans)`` raises ``TypeError``/``ValueError`` for a bad batch; ``loss(outputs,
    targets)`` is the per-sample loss ``[B]``."""

    check: Callable[[torch.Tensor, torch.Tensor, int, int], None]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


OBJECTIVES: dict[str, Objective] = {
    "classification": Objective(check_batch, per_sample_cross_entropy),
    "segmentation": Objective(lambda x, y, k, c: check_batch(x, y, k, c, per_pixel=True), dice_ce_loss),
}
"""Objective of each task name (a model's or data set's ``task``; a new task registers its own here too)."""


def objective_of(obj) -> Objective:
    """The objective of a model or data set (its ``task``, default classification)."""
    name = getattr(obj, "task", "classification")
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"no objective for task {name!r}; known: {sorted(OBJECTIVES)} (zoo.dp.objectives.OBJECTIVES)"
                         ) from None
