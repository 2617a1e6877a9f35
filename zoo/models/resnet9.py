"""ResNet-9 with ScaleNorm (Klause et al. 2022) as used for DP by Hölzl et al. 2023.

Conv -> GroupNorm -> act blocks, max pooling, and an extra GroupNorm after each residual addition
("ScaleNorm"). GroupNorm computes mean and variance per sample over groups of channels and all
positions; no batch statistics. Max pooling of the last feature map before a linear head.
"""
from __future__ import annotations

from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooClassifier
from zoo.nn.layers import get_act_layer, get_norm_layer


def _conv_block(cin, cout, norm, act, pool=False):
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), act()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """``x -> GN(x + block(x))``: the ScaleNorm residual."""

    def __init__(self, channels, norm, act):
        super().__init__()
        self.body = nn.Sequential(_conv_block(channels, channels, norm, act), _conv_block(channels, channels, norm, act))
        self.norm = norm(channels)

    def forward(self, x):
        return self.norm(x + self.body(x))


@register_family("resnet9")
class ResNet9(ZooClassifier):
    """ResNet-9 (ScaleNorm layout). Args: width (base channels, 64 in the paper), num_classes, in_chans,
    norm, act."""

    min_size = 8

    def __init__(self, width: int = 64, num_classes: int = 10, in_chans: int = 3,
                 norm: str = "groupnorm", act: str = "mish"):
        super().__init__()
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        w = [width, 2 * width, 4 * width, 8 * width]
        self.in_chans, self.num_classes = in_chans, num_classes
        self.features = nn.Sequential(
            _conv_block(in_chans, w[0], norm_f, act_f),
            _conv_block(w[0], w[1], norm_f, act_f, pool=True),
            _Residual(w[1], norm_f, act_f),
            _conv_block(w[1], w[2], norm_f, act_f, pool=True),
            _conv_block(w[2], w[3], norm_f, act_f, pool=True),
            _Residual(w[3], norm_f, act_f),
        )
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.num_features = w[3]
        self.head = nn.Linear(w[3], num_classes)

    def forward_features(self, x):
        return self.pool(self.features(x))
