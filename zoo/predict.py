"""Masks for a user's own images: :func:`segment` runs a zoo segmentation model on raw images of any size.

The contract, in one place: an image is prepared as the model's training data were (its checkpoint's
``preparation``, :func:`zoo.data.prepare_input`), and its mask comes back at the image's own size.

- **Resized training** (``preparation["resize"]`` set: the training images were resized to one size, e.g. Weizmann
  horses, photographs of every size): the image is resized to ``input_size`` in the same way, segmented whole, and
  the logits are resized back (bilinear) to the image's size before the argmax. The object fills the model's view as
  it did in training, whatever the image's resolution.
- **Training at the data's own pixel scale** (no resize, e.g. ISBI 2012 EM slices, trained on crops of the 512x512
  slices): the image is segmented at its own scale. Up to ``tile`` (default: the training images' size,
  ``input_size``) it is segmented whole; a larger image in overlapping ``tile x tile`` windows whose logits are
  averaged with weights that fall linearly towards each window's border, so that no seam shows where windows meet.
  Pass images at the training data's pixel size (nm per pixel for EM); the model cannot know another scale.

Each window (or whole image) is reflect-padded on its bottom and right edges up to the model's ``size_multiple``,
and the padding is cropped from its logits. Why windows no larger than the training images: every zoo model
normalises with GroupNorm, which averages over the whole spatial extent of a sample, so a window of the training
size gives the statistics that the model saw in training and in its reported test evaluation (an image of
exactly ``input_size`` is segmented in one pass, as :func:`zoo.evaluate` segments the test split).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from zoo.data.base import prepare_input
from zoo.nn.equivariant import export

__all__ = ["segment"]


def _as_chw(image: Any) -> torch.Tensor:
    """One image as ``[C, H, W]``: a tensor ``[H, W]`` or ``[C, H, W]`` (torch's layout), or a numpy array / PIL
    image ``[H, W]`` or ``[H, W, C]`` (the layout images are stored in, as torchvision's ``to_tensor`` reads it)."""
    if isinstance(image, torch.Tensor):
        x = image
        if x.dim() == 2:
            x = x.unsqueeze(0)
    else:
        import numpy as np

        try:
            arr = np.asarray(image)
        except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is the same user error
            raise TypeError(f"segment expects images as torch tensors, numpy arrays or PIL images, got "
                            f"{type(image).__name__}") from exc
        if arr.dtype == object or arr.ndim not in (2, 3):
            raise ValueError(f"a numpy/PIL image must be [H, W] or [H, W, C], got shape {arr.shape}")
        x = torch.tensor(arr)  # a copy: PIL arrays are read-only
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    if x.dim() != 3:
        raise ValueError(f"one image must be [H, W] or [C, H, W] (a batch: [N, C, H, W]), got shape {tuple(x.shape)}")
    if x.shape[0] > 4:
        raise ValueError(f"an image tensor has {x.shape[0]} channels in its first dimension: torch images are "
                         f"[C, H, W]; permute an [H, W, C] tensor with x.permute(2, 0, 1)")
    return x


def _weights(size: int) -> torch.Tensor:
    """Triangular blending weights ``min(i + 1, size - i)``: largest in the middle of a window, 1 at its border."""
    i = torch.arange(size)
    return torch.minimum(i + 1, size - i).float()


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Window offsets covering ``[0, length)`` with windows of ``tile``: every ``stride``, the last flush with the
    end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` for ``x`` [1, C, h, w] of any size: padded (reflect where the image is large enough, else
    replicate) on the bottom and right to the model's ``size_multiple`` and its ``min_size``, the padding cropped."""
    h, w = x.shape[-2:]
    m, least = getattr(model, "size_multiple", 1), getattr(model, "min_size", 1)
    ph = max(math.ceil(h / m) * m, math.ceil(least / m) * m) - h
    pw = max(math.ceil(w / m) * m, math.ceil(least / m) * m) - w
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return model(x)[..., :h, :w]


def _segment_one(model, x: torch.Tensor, cfg: dict, tile: int | None, overlap: float) -> torch.Tensor:
    """Logits ``[K, H, W]`` of one prepared image ``x`` ``[C, H, W]`` (see the module's contract)."""
    x = x.unsqueeze(0)
    h, w = x.shape[-2:]
    if cfg.get("resize"):
        size = tuple(cfg["input_size"][1:])
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True) \
            if (h, w) != size else x
        logits = _logits(model, small)
        if (h, w) != size:
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits[0]
    th = tw = tile if tile is not None else None
    if th is None:
        th, tw = cfg["input_size"][1:]
    if h <= th and w <= tw:
        return _logits(model, x)[0]
    th, tw = min(th, h), min(tw, w)
    total = weight = None
    wy, wx = _weights(th).to(x), _weights(tw).to(x)
    for y in _starts(h, th, max(1, round(th * (1 - overlap)))):
        for x0 in _starts(w, tw, max(1, round(tw * (1 - overlap)))):
            out = _logits(model, x[..., y:y + th, x0:x0 + tw])[0]
            if total is None:
                total = x.new_zeros(out.shape[0], h, w)
                weight = x.new_zeros(1, h, w)
            ww = wy[:, None] * wx[None, :]
            total[:, y:y + th, x0:x0 + tw] += out * ww
            weight[:, y:y + th, x0:x0 + tw] += ww
    return total / weight


def segment(model, images: Any, *, cfg: dict | None = None, tile: int | None = None, overlap: float = 0.25,
            return_probs: bool = False):
    """Masks for raw images of any size from a zoo segmentation model (the module docstring gives the contract).

    Args:
        model: a zoo segmentation model (:class:`zoo.models._base.ZooSegmenter`), e.g.
            ``zoo.create_model("unet-w16.dp_eps8", pretrained=True)``. It runs as :func:`zoo.evaluate` runs it:
            a copy (:func:`zoo.export`: eval mode, equivariant layers expanded) without gradients; ``model`` itself
            is left as it is.
        images: one image (a tensor ``[H, W]`` / ``[C, H, W]``; a numpy array or PIL image ``[H, W]`` /
            ``[H, W, C]``), a batch tensor ``[N, C, H, W]``, or a list of images of different sizes. Pixels are raw:
            uint8 0-255, or float in [0, 1]; the preparation (channels, normalisation, resize) is applied here.
        cfg: the input preparation (a checkpoint sidecar's ``preparation``); default ``model.pretrained_cfg``,
            which ``zoo.create_model(..., pretrained=True)`` sets.
        tile: the largest window segmented in one pass, in pixels (training at the data's own scale only);
            default the training images' size, ``cfg["input_size"]``.
        overlap: the fraction of a window that overlaps its neighbour, in ``[0, 1)``.
        return_probs: give the class probabilities ``[K, H, W]`` per image instead of the masks.

    Returns:
        For one image a ``LongTensor [H, W]`` of class indices (``cfg["classes"]`` names them); for a batch
        ``[N, H, W]``; for a list a list. With ``return_probs`` float ``[K, H, W]`` (``[N, K, H, W]``) instead.
    """
    if getattr(model, "task", None) != "segmentation":
        raise TypeError(f"segment needs a zoo segmentation model; {type(model).__name__} is a "
                        f"{getattr(model, 'task', 'non-zoo')} model (classifiers give logits: call the model)")
    cfg = cfg if cfg is not None else getattr(model, "pretrained_cfg", None)
    if not cfg:
        raise ValueError("segment needs the model's input preparation: create it with zoo.create_model(name, "
                         "pretrained=True), or pass cfg= (the 'preparation' block of the checkpoint's sidecar)")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile must be a positive int (pixels) or None, got {tile!r}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if isinstance(images, (list, tuple)):
        return [segment(model, im, cfg=cfg, tile=tile, overlap=overlap, return_probs=return_probs)
                for im in images]
    batch = isinstance(images, torch.Tensor) and images.dim() == 4
    xs = images if batch else _as_chw(images).unsqueeze(0)
    if xs.shape[0] == 0:
        raise ValueError("the batch holds no images")
    prepared = prepare_input(xs, cfg)
    plain = export(model)  # eval mode, equivariant layers expanded: as zoo.evaluate runs it; model is untouched
    param = next(plain.parameters(), None)
    if param is not None:
        prepared = prepared.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        logits = torch.stack([_segment_one(plain, p, cfg, tile, overlap) for p in prepared])
    out = logits.float().softmax(1) if return_probs else logits.argmax(1)
    return out if batch else out[0]
