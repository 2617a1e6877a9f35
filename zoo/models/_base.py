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
