"""Tasks: what a model predicts and how that is checked, scored, augmented and evaluated.

A task is the one place that knows the shape of targets and outputs. The engine, the per-sample gradients and
the tests ask the task of the model (``model.task``) or of the data set (``DatasetInfo.task``); a new task is
added by registering it (:func:`register_task`), not by special cases.

DP contract of every task: ``loss(outputs, targets)`` returns one loss per sample, computed from that sample's
outputs and targets only, so the gradient of entry i is sample i's gradient (see :mod:`zoo.dp.grad_sample`).

* ``classification``: outputs ``[B, K]`` logits, targets int64 ``[B]``; cross-entropy; accuracy, balanced
  accuracy (mean recall over the classes present: what an imbalanced medical set needs) and ROC-AUC (binary: of
  the class-1 probability; more classes: the mean of the one-vs-rest AUCs).
* ``segmentation``: outputs ``[B, K, H, W]`` per-pixel logits, targets int64 masks ``[B, H, W]``; loss = mean
  per-pixel cross-entropy of the sample + (1 - its soft Dice averaged over the classes); metrics: Dice and IoU
  per class over all pixels of the split, and their mean over the foreground classes (1..K-1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zoo.data.base import augment
from zoo.dp.objectives import OBJECTIVES
from zoo.registrar import instance_registrar


class Task:
    """Base class of a task. ``check_batch`` and ``loss`` are the task's objective's (:mod:`zoo.dp.objectives`, one
    definition per task name); subclasses implement ``score``, ``views``, ``evaluate``, ``example_targets`` and
    ``output_shape``."""

    name: str = ""
    score_name: str = ""  # the per-sample training statistic shown in progress bars
    recipe_keys: tuple[str, ...] = ()  # optional recipe settings this task reads (see zoo.catalog.cards.RECIPE_SCHEMA)

    def check_batch(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, in_chans: int) -> None:
        """The task's batch check: its objective's (:mod:`zoo.dp.objectives`, the one definition)."""
        OBJECTIVES[self.name].check(x, y, num_classes, in_chans)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[B]``: the task's objective's (:mod:`zoo.dp.objectives`)."""
        return OBJECTIVES[self.name].loss(outputs, targets)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Sum over the samples of a per-sample quality in [0, 1] (training statistic only)."""
        raise NotImplementedError

    def views(self, x: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator, info, recipe: dict
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training input: each sample as ``k`` consecutive augmented views (augmentation multiplicity)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data, batch_size: int, device, progress: bool) -> dict[str, float]:
        raise NotImplementedError

    def example_targets(self, batch: int, num_classes: int, size: tuple[int, int],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Random valid targets for ``batch`` samples of spatial ``size`` (tests, benchmarks)."""
        raise NotImplementedError

    def output_shape(self, batch: int, num_classes: int, size: tuple[int, int]) -> tuple[int, ...]:
        raise NotImplementedError


_TASKS: dict[str, Task] = {}


register_task = instance_registrar(_TASKS, "task")  # class decorator: @register_task("name")


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {sorted(_TASKS)}") from None


def task_of(obj) -> Task:
    """The task of a model or a data set (``.task``, default classification)."""
    return get_task(getattr(obj, "task", "classification"))


@register_task("classification")
class Classification(Task):
    recipe_keys = ("resize",)
    score_name = "acc"

    def score(self, outputs, targets):
        return (outputs.argmax(1) == targets).sum().item()

    def views(self, x, y, k, generator, info, recipe):
        if k == 1:
            return x, y
        return augment(x.repeat_interleave(k, 0), generator), y.repeat_interleave(k)

    @torch.no_grad()
    def evaluate(self, model, data, batch_size, device, progress):
        n, outs = len(data), []
        for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
            x, _ = data.batch(slice(start, start + batch_size))
            outs.append(model(x.to(device)).float().cpu())
        logits, y = torch.cat(outs), data.targets
        probs = logits.double().softmax(1)
        pred, k = logits.argmax(1), logits.shape[1]
        metrics = {"accuracy": (pred == y).double().mean().item(), "balanced_accuracy": balanced_accuracy(pred, y, k),
                   "roc_auc": roc_auc(probs, y), "loss": F.cross_entropy(logits, y).item(), "num_samples": n}
        return {**metrics, **honesty_report(pred, y, k, metrics, getattr(data.info, "classes", None))}

    def example_targets(self, batch, num_classes, size, generator=None):
        return torch.randint(0, num_classes, (batch,), generator=generator)

    def output_shape(self, batch, num_classes, size):
        return (batch, num_classes)


CONSTANT_SHARE = 0.95
"""Predictions are called (nearly) constant when one class takes at least this share of them."""
CHANCE_MARGIN = 0.02
"""Balanced accuracy within this of chance (1 / classes present) does not beat chance."""


def honesty_report(pred: torch.Tensor, labels: torch.Tensor, num_classes: int, metrics: dict,
                   classes=None) -> dict:
    """What a classifier's scores mean on small or imbalanced data, beside them in ``result.json``:

    - ``baseline``: the majority-class reference, "always predict the most frequent test class" (its accuracy;
      its balanced accuracy is chance, 1 / classes present; its ROC-AUC 0.5);
    - ``per_class_recall`` and ``confusion_matrix`` (rows: true class, columns: predicted), and which ROC-AUC
      ``roc_auc`` is (``roc_auc_kind``: of class 1 for two classes, else the macro one-vs-rest mean);
    - ``warnings`` (plain words) and ``degenerate`` (true when any applies): the predictions are (nearly) constant
      (one class takes at least :data:`CONSTANT_SHARE` of them), or balanced accuracy does not beat chance by
      :data:`CHANCE_MARGIN`."""
    names = [str(c) for c in classes] if classes and len(classes) == num_classes else [str(c) for c in
                                                                                          range(num_classes)]
    counts = torch.bincount(labels, minlength=num_classes)
    present = int((counts > 0).sum())
    major = int(counts.argmax())
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    recall = [confusion[c, c].item() / counts[c].item() if counts[c] else None for c in range(num_classes)]
    chance = 1 / max(present, 1)
    share = torch.bincount(pred, minlength=num_classes).double() / max(len(pred), 1)
    top = int(share.argmax())
    warnings = []
    if share[top] >= CONSTANT_SHARE and present > 1:
        warnings.append(f"(nearly) constant predictions: {share[top]:.0%} of the test images are predicted "
                        f"{names[top]!r}; the model has not learned to tell the classes apart")
    if metrics["balanced_accuracy"] <= chance + CHANCE_MARGIN:
        warnings.append(f"balanced accuracy {metrics['balanced_accuracy']:.3f} does not beat chance ({chance:.3f} for "
                        f"{present} classes); accuracy {metrics['accuracy']:.3f} against the majority-class "
                        f"baseline's {counts[major].item() / max(len(labels), 1):.3f}")
    return {"baseline": {"rule": f"always predict {names[major]!r} (the most frequent test class)",
                         "accuracy": counts[major].item() / max(len(labels), 1), "balanced_accuracy": chance,
                         "roc_auc": 0.5},
            "roc_auc_kind": f"class {names[1]!r} against {names[0]!r}" if num_classes == 2 else "macro one-vs-rest",
            "per_class_recall": dict(zip(names, recall)), "confusion_matrix": confusion.tolist(),
            "classes": names, "warnings": warnings, "degenerate": bool(warnings)}


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of the fraction of that class predicted correctly (recall)."""
    recalls = [(pred[labels == c] == c).double().mean().item() for c in range(num_classes) if (labels == c).any()]
    return sum(recalls) / len(recalls)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    sorted_x, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = ((ends - counts + 1 + ends) / 2)[inverse]
    return ranks


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC-AUC = P(score of a random positive > score of a random negative) + P(tie) / 2 (Mann-Whitney U with
    average ranks); NaN when one of the two groups is empty."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def roc_auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC-AUC of class probabilities ``[N, K]``: for K = 2 that of class 1, else the mean one-vs-rest AUC over
    the classes present in ``labels`` (NaN when fewer than two classes are present)."""
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], labels == 1)
    aucs = [binary_auc(probs[:, c], labels == c) for c in range(probs.shape[1]) if (labels == c).any()]
    aucs = [a for a in aucs if a == a]
    return sum(aucs) / len(aucs) if aucs else float("nan")


def confusion_counts(pred: torch.Tensor, masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K, 3]`` counts (true positives, false positives, false negatives) per class over all pixels."""
    out = torch.zeros(num_classes, 3, dtype=torch.int64)
    for c in range(num_classes):
        p, t = pred == c, masks == c
        out[c] = torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()])
    return out


def dice_iou(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Dice ``2TP / (2TP + FP + FN)`` and IoU ``TP / (TP + FP + FN)`` from :func:`confusion_counts`
    (1 for a class absent from both prediction and truth)."""
    tp, fp, fn = counts.double().unbind(1)
    denom = tp + fp + fn
    dice = torch.where(denom > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.ones_like(tp))
    iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.ones_like(tp))
    return dice, iou


@register_task("segmentation")
class Segmentation(Task):
    score_name = "dice"
    recipe_keys = ("crop", "resize")

    def score(self, outputs, targets):
        k = outputs.shape[1]
        pred = outputs.argmax(1)
        total = 0.0
        for i in range(len(pred)):
            dice, _ = dice_iou(confusion_counts(pred[i], targets[i], k))
            total += dice[1:].mean().item() if k > 1 else dice.mean().item()
        return total

    def views(self, x, y, k, generator, info, recipe):
        from zoo.data.segmentation import augment_pair

        x, y = (x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)) if k > 1 else (x, y)
        return augment_pair(x, y, generator, crop=recipe.get("crop"), dihedral=getattr(info, "dihedral", False))

    @torch.no_grad()
    def evaluate(self, model, data, batch_size, device, progress):
        k = model.num_classes
        counts, loss, n = torch.zeros(k, 3, dtype=torch.int64), 0.0, len(data)
        for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
            x, y = data.batch(slice(start, start + batch_size))
            logits = model(x.to(device)).float().cpu()
            loss += self.loss(logits, y).sum().item()
            counts += confusion_counts(logits.argmax(1), y, k)
        dice, iou = dice_iou(counts)
        names = getattr(data.info, "classes", [str(c) for c in range(k)])
        out = {"dice": dice[1:].mean().item(), "iou": iou[1:].mean().item(), "loss": loss / n, "num_samples": n}
        out["pixel_accuracy"] = counts[:, 0].sum().item() / max(1, int(counts[:, 0].sum() + counts[:, 2].sum()))
        for c, name in enumerate(names):
            out[f"dice_{name}"], out[f"iou_{name}"] = dice[c].item(), iou[c].item()
        return out

    def example_targets(self, batch, num_classes, size, generator=None):
        return torch.randint(0, num_classes, (batch, *size), generator=generator)

    def output_shape(self, batch, num_classes, size):
        return (batch, num_classes, *size)
