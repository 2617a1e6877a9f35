"""The input contract of every zoo model, checked in one place: images are a floating-point tensor
``[B, in_chans, H, W]`` with finite values. The model's forward (:meth:`zoo.models._base.ZooClassifier.check_input`,
which adds its own size and dtype rules) and the training batch check (:func:`zoo.dp.objectives.check_batch`, which
adds the targets) both call :func:`check_images`, so a bad input gets the same message wherever it enters."""
from __future__ import annotations

import torch


def functorch_wrapped(x: torch.Tensor) -> bool:
    """True inside a torch.func transform (vmap, grad), where a tensor's values cannot decide a branch."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def check_images(x, in_chans: int, who: str = "the model") -> None:
    """Raise ``TypeError``/``ValueError`` saying what to change unless ``x`` is a floating-point tensor
    ``[B, in_chans, H, W]`` with finite values (values are not checked inside ``torch.func`` transforms, whose callers
    check the batch first). ``who`` names the receiver in the messages."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}; convert with torch.as_tensor")
    if x.dim() != 4:
        raise ValueError(f"{who} expects images [B, C, H, W] (4-D), got {x.dim()}-D shape {tuple(x.shape)}; add a "
                         "batch dimension with x.unsqueeze(0) for a single image")
    if x.shape[1] != in_chans:
        raise ValueError(f"{who} was built for {in_chans} input channels: expected {in_chans} channels, got "
                         f"{x.shape[1]} (shape {tuple(x.shape)}; channels-last input must be permuted to "
                         f"[B, C, H, W]); convert the images or create the model with in_chans={x.shape[1]}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects floating point images, got {x.dtype}; convert with x.float() / 255 and "
                        "normalise")
    if not functorch_wrapped(x) and not bool(torch.isfinite(x).all()):  # vmap cannot branch on values
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"images contain {bad} NaN or Inf values (of {x.numel()}); the outputs would be NaN. Clean "
                         "the data or fix its normalisation (e.g. a zero std)")
