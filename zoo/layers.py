"""DP-safe building blocks shared by every model family.

Nothing here uses batch statistics: every normalization averages over the features of one sample only,
so a sample's output (and therefore its gradient) never depends on the other samples of the batch.
Every layer with trainable parameters has an exact per-sample gradient (see :mod:`zoo.grad_sample`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WSConv2d", "get_norm_layer", "get_act_layer", "NORM_LAYERS", "ACT_LAYERS"]


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardization (Qiao et al. 2019; used by De et al. 2022 for DP).

    The filter used in the forward pass is ``(w - mean) / sqrt(var + eps)``, with mean and (biased) variance
    taken per output channel over ``in_channels/groups x kH x kW``. It depends on the weights only, never on
    data, so it is DP-safe. Per-sample gradients are those of ``nn.Conv2d`` for the standardized filter,
    pulled back through the standardization (``zoo.grad_sample``).
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return standardize(self.weight if weight is None else weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is not above ``at_most`` (number of groups for a GroupNorm)."""
    g = max(1, min(at_most, n))
    while n % g:
        g -= 1
    return g


def _group_norm(groups: int) -> Callable[[int], nn.Module]:
    def make(channels: int) -> nn.Module:
        return nn.GroupNorm(largest_divisor(channels, groups), channels)

    return make


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    # GroupNorm: mean/variance per sample over groups of channels and all spatial positions.
    "groupnorm": _group_norm(16),
    "groupnorm32": _group_norm(32),
    # LayerNorm over (C, H, W) of one sample: GroupNorm with a single group.
    "layernorm": lambda c: nn.GroupNorm(1, c),
    # InstanceNorm with affine: one group per channel, statistics over H x W of one sample.
    "instancenorm": lambda c: nn.GroupNorm(c, c),
}

ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,  # never in place: it would corrupt the activations opacus hooks keep
    "mish": nn.Mish,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def _lookup(table: dict, name: str, kind: str):
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {name!r}; zoo offers only per-sample (DP-safe) choices: {sorted(table)}. "
            "Batch statistics (BatchNorm) mix samples and break the per-sample sensitivity bound."
        ) from None


def get_norm_layer(name: str) -> Callable[[int], nn.Module]:
    """Return a factory ``channels -> module`` for a per-sample normalization (timm's ``get_norm_layer``).

    Only normalizations whose statistics come from a single sample are offered; ``'batchnorm'`` is refused.
    """
    return _lookup(NORM_LAYERS, name, "normalization")


def get_act_layer(name: str) -> Callable[[], nn.Module]:
    """Return a factory for an activation module (``'relu'``, ``'mish'``, ...)."""
    return _lookup(ACT_LAYERS, name, "activation")


def conv2d(cin: int, cout: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
           ws: bool = False) -> nn.Conv2d:
    """Bias-free conv with 'same' padding (odd kernels), weight-standardized with ``ws=True``."""
    cls = WSConv2d if ws else nn.Conv2d
    return cls(cin, cout, kernel_size, stride=stride, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
               bias=False)


def conv3x3(cin: int, cout: int, stride: int = 1, ws: bool = True) -> nn.Conv2d:
    return conv2d(cin, cout, 3, stride, ws=ws)


def conv_norm_act(cin: int, cout: int, norm: Callable[[int], nn.Module], act: Callable[[], nn.Module],
                  kernel_size: int = 3, dilation: int = 1, ws: bool = False) -> nn.Sequential:
    """``Conv(k x k, 'same' padding, no bias) -> norm -> act``: the conv unit of zoo's segmentation families
    (the norm is a per-sample one from :func:`get_norm_layer`; its bias makes the conv's redundant)."""
    return nn.Sequential(conv2d(cin, cout, kernel_size, dilation=dilation, ws=ws), norm(cout), act())


def double_conv(cin: int, cout: int, norm: Callable[[int], nn.Module], act: Callable[[], nn.Module],
                ws: bool = False) -> nn.Sequential:
    """Two :func:`conv_norm_act` 3x3 units, ``cin -> cout -> cout``: the U-Net block."""
    return nn.Sequential(conv_norm_act(cin, cout, norm, act, ws=ws), conv_norm_act(cout, cout, norm, act, ws=ws))


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling (half-pixel centres). Symmetric under flips and transposes of the grid, so it
    commutes exactly with the dihedral grid actions (used by the equivariant U-Net)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def standardize(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional form of :meth:`WSConv2d.standardized_weight` (used for per-sample pull-backs)."""
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), keepdim=True, unbiased=False)
    return (w - mean) * torch.rsqrt(var + eps)
