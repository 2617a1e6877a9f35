"""ScatterNet + CNN / + linear (Tramèr & Boneh 2021, arXiv:2011.11660): a fixed wavelet front end, then a small
tanh CNN or a linear classifier.

Tramèr & Boneh showed that, at the compute and privacy budgets where end-to-end CNNs learn little, a CNN on
handcrafted scattering features does better (CIFAR-10 at epsilon=3: 69.3 % against 59.2 %): the front end has
no parameters, so DP-SGD's noise falls only on the small network after it.

Layout (CIFAR-10, 3x32x32, the paper's ``CIFAR10_CNN`` on scattered input):

- :class:`zoo.nn.layers.Scattering2D` (J=2 scales, L=8 orientations, order 2): 81 coefficients per input channel
  at a quarter of the resolution, 243x8x8;
- ``norm="group"``: GroupNorm without affine parameters over groups of scattering channels (27 groups of 9):
  mean and variance per sample over the channels of a group and all positions; it spends no privacy budget.
  ``norm="data"``: the paper's data normalisation (:class:`zoo.nn.layers.DataStandardize`): each scattering channel
  standardised with its mean and variance over the whole training set, released privately once before training
  (:mod:`zoo.dp.data_norm`, recorded in the ledger; the paper's choice for CIFAR-10), the channels of each
  scattering order (0, 1, 2) as a group with clips of their own (three groups: six Gaussian releases);
- conv 3x3 (``width``) + tanh, max pooling to 4x4, conv 3x3 (``width``) + tanh, flatten, linear head; or, with
  ``width=0``, the paper's ScatterNet + linear: a linear head on the 15,552 normalised coefficients.

Every trainable layer is a plain ``nn.Conv2d``/``nn.Linear`` (exact per-sample gradients in opacus). The
pooling is adaptive (to 4x4), so the model also takes other sizes that are multiples of ``2**J`` (for example
28x28: 7x7 features pooled to 4x4); at 32x32 it is the paper's 2x2 max pooling.
"""
from __future__ import annotations

from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooClassifier
from zoo.nn.layers import DataStandardize, Scattering2D, get_act_layer, largest_divisor


class _ToGrid(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling to ``size x size``; the identity (no copy, no backward) when already that size."""

    def forward(self, x):
        return x if x.shape[-2:] == (self.output_size, self.output_size) else super().forward(x)


@register_family("scatternet")
class ScatterNetCNN(ZooClassifier):
    """ScatterNet + CNN, or ScatterNet + linear with ``width=0``. Args: width (channels of both convs, 64 in the
    paper; 0: a linear head on the normalised coefficients, average-pooled to ``grid x grid``), J and L
    (scattering scales and orientations), norm (``group``: GroupNorm; ``data``: private data statistics),
    norm_groups (GroupNorm groups over the scattering channels, at most), num_classes, in_chans, act (``tanh`` in the paper), grid (``width=0`` only: the side of the coefficient grid
    the linear head reads, ``input side / 2**J`` for the identity: 8 at 32x32, 7 at 28x28)."""

    def __init__(self, width: int = 64, J: int = 2, L: int = 8, norm_groups: int = 27, num_classes: int = 10,
                 in_chans: int = 3, act: str = "tanh", grid: int = 8, norm: str = "group"):
        super().__init__()
        act_f = get_act_layer(act)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.size_multiple = 2 ** J
        self.min_size = 4 * 2 ** J
        self.scattering = Scattering2D(J, L)
        k = in_chans * self.scattering.coefficients
        if norm not in ("group", "data"):
            raise ValueError(f"norm must be 'group' (GroupNorm) or 'data' (private data statistics), got {norm!r}")
        self.norm = (nn.GroupNorm(largest_divisor(k, norm_groups), k, affine=False) if norm == "group"
                     else DataStandardize(k, groups=self.scattering.orders * in_chans))  # released by order
        if width:
            self.features = nn.Sequential(
                nn.Conv2d(k, width, 3, padding=1), act_f(), nn.AdaptiveMaxPool2d(4),
                nn.Conv2d(width, width, 3, padding=1), act_f(), nn.Flatten(),
            )
            self.num_features = width * 16
        else:  # ScatterNet + linear: the normalised coefficients themselves, on a grid x grid grid
            self.features = nn.Sequential(_ToGrid(grid), nn.Flatten())
            self.num_features = k * grid * grid
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return self.features(self.norm(self.scattering(x)))
