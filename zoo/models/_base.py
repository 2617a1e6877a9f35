"""The contract every zoo model meets: input checks, and a timm-style head API (``get_classifier``,
``reset_classifier``). :class:`ZooClassifier` predicts ``[B, K]`` logits, :class:`ZooSegmenter` per-pixel logits
``[B, K, H, W]``; each names its task (:mod:`zoo.data.tasks`)."""
from __future__ import annotations

import torch
from torch import nn

from zoo.nn.inputs import check_images


class ZooClassifier(nn.Module):
    """Base class of zoo classifiers.

    ``forward`` checks its input first (:meth:`check_input`): a ``[B, in_chans, H, W]`` tensor of the
    parameters' floating dtype, of a size the model takes, with finite values (not checked inside ``torch.func``
    transforms, whose callers check the batch: :func:`zoo.dp.grad_sample.prepare_batch`); anything else raises
    ``TypeError``/``ValueError`` saying what to change. A batch of size 0 gives an empty output.

    Subclasses set ``in_chans``, ``num_classes``, ``min_size`` (smallest accepted height/width) and
    ``head_name`` (attribute holding the final ``nn.Linear``), and implement ``forward_features`` returning
    pooled features ``[B, num_features]``.
    """

    task = "classification"
    in_chans: int
    num_classes: int
    min_size: int = 1
    size_multiple: int = 1
    head_name: str = "head"

    def check_input(self, x: torch.Tensor) -> None:
        """The model's input contract: :func:`zoo.nn.inputs.check_images` (a finite floating ``[B, in_chans, H,
        W]`` tensor), then this model's own rules: height and width at least ``min_size`` and divisible by
        ``size_multiple``, and the parameters' dtype."""
        name = type(self).__name__
        check_images(x, self.in_chans, name)
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f"{name} needs images of at least {self.min_size}x{self.min_size}, got "
                             f"{x.shape[2]}x{x.shape[3]}; resize or pad the input")
        if x.shape[2] % self.size_multiple or x.shape[3] % self.size_multiple:
            raise ValueError(f"{name} needs a height and width divisible by {self.size_multiple} (one per "
                             f"downsampling), got {x.shape[2]}x{x.shape[3]}; crop or pad the input")
        weight = next(self.parameters(), None)
        if weight is not None and x.dtype != weight.dtype:
            raise TypeError(f"{name} has {weight.dtype} parameters but the images are {x.dtype}; convert the "
                            f"images with x.to({weight.dtype}) or the model with model.to({x.dtype})")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.get_classifier()(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return getattr(self, self.head_name)

    def new_head(self, old: nn.Module, num_classes: int) -> nn.Module:
        """A head like ``old`` for ``num_classes`` classes: a ``nn.Linear`` on the pooled features."""
        return nn.Linear(old.in_features, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one for ``num_classes`` classes (fine-tuning)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (a single class has nothing to predict), "
                             f"got {num_classes!r}")
        old = self.get_classifier()
        head = self.new_head(old, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        setattr(self, self.head_name, head)
        self.num_classes = num_classes


class ZooSegmenter(ZooClassifier):
    """Base class of zoo segmentation models: per-pixel logits ``[B, num_classes, H, W]`` at the input size.

    Subclasses set ``in_chans``, ``num_classes``, ``size_multiple`` (H and W must be multiples of it) and
    implement ``forward_features`` returning ``[B, num_features, H, W]``; the head is a 1x1 ``nn.Conv2d``.
    """

    task = "segmentation"

    def new_head(self, old: nn.Module, num_classes: int) -> nn.Module:
        """A 1x1 ``nn.Conv2d`` head for ``num_classes`` classes on the per-pixel features."""
        return nn.Conv2d(old.in_channels, num_classes, 1)


TRAINABLE_PRESETS = {
    "all": "every parameter (the default)",
    "head": "the classifier / segmentation head only (a linear probe on the features)",
    "head+norm": "the head and the affine parameters of every normalisation layer (GroupNorm, LayerNorm, ...)",
}
"""Named selections of the parameters DP-SGD trains (the recipe's ``trainable``); anything else is read as
comma-separated ``fnmatch`` patterns over parameter names (``model.named_parameters()``), e.g. ``decoder.*,head.*``."""


def trainable_names(model: nn.Module, spec: str | None) -> list[str]:
    """The names of the parameters that ``spec`` (:data:`TRAINABLE_PRESETS`, or comma-separated ``fnmatch`` patterns)
    selects, in ``named_parameters`` order. A pattern that matches no parameter raises ``ValueError`` naming a few."""
    from fnmatch import fnmatchcase

    names = [n for n, _ in model.named_parameters()]
    if spec in (None, "", "all"):
        return names
    selected: set[str] = set()
    if spec in ("head", "head+norm"):
        head = getattr(model, "head_name", None)
        if head is None:
            raise ValueError(f"{type(model).__name__} names no head (head_name); give parameter-name patterns")
        selected |= {n for n in names if n.startswith(head + ".")}
        if spec == "head+norm":
            selected |= {f"{m}.{p}" if m else p for m, mod in model.named_modules() if "Norm" in type(mod).__name__
                         for p, _ in mod.named_parameters(recurse=False)}
    else:
        for pattern in (s.strip() for s in spec.split(",")):
            hit = {n for n in names if fnmatchcase(n, pattern)}
            if not pattern or not hit:
                raise ValueError(f"trainable pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                                 f"its parameters are named like {names[:3] + names[-2:]} (presets: "
                                 f"{', '.join(TRAINABLE_PRESETS)})")
            selected |= hit
    if not selected:
        raise ValueError(f"trainable={spec!r} selects no parameter of {type(model).__name__}")
    return [n for n in names if n in selected]


def set_trainable(model: nn.Module, spec: str | None) -> tuple[int, int]:
    """Freeze (``requires_grad=False``) every parameter of ``model`` that ``spec`` does not select
    (:func:`trainable_names`); return ``(trainable, total)`` parameter counts. DP-SGD then computes, clips and noises
    the gradients of the selected parameters only; the frozen ones are constants of the released function (their
    values must not depend on the private data: a public or earlier-released checkpoint, or the initialisation)."""
    keep = set(trainable_names(model, spec))
    total = trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        total += p.numel()
        trainable += p.numel() if name in keep else 0
    return trainable, total
