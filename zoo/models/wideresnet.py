"""WideResNet for DP-SGD (De et al. 2022; Sander et al. 2023, TAN).

Weight-standardized 3x3 convolutions, GroupNorm(16) and the activation *before* the normalization
(Conv -> act -> GN), which TAN found better than Conv -> GN -> act under DP. No batch statistics anywhere.
Depth ``6n + 4``, widths ``16, 16k, 32k, 64k``; invariant global average pooling before a linear head.
"""
from __future__ import annotations

from torch import nn

from ..layers import WSConv2d, conv3x3, get_act_layer, get_norm_layer
from ..registry import register_family
from ._base import ZooClassifier


class WideBasicBlock(nn.Module):
    """``x -> GN(act(conv3x3(x))) -> GN(act(conv3x3(.))) + shortcut(x)``; the shortcut is a 1x1 WS conv
    when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm, act):
        super().__init__()
        self.conv1, self.act1, self.norm1 = conv3x3(cin, cout, stride), act(), norm(cout)
        self.conv2, self.act2, self.norm2 = conv3x3(cout, cout), act(), norm(cout)
        self.shortcut = (
            WSConv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        h = self.norm1(self.act1(self.conv1(x)))
        h = self.norm2(self.act2(self.conv2(h)))
        return h + self.shortcut(x)


@register_family("wideresnet")
class WideResNet(ZooClassifier):
    """WRN-``depth``-``width``. Args: depth (6n+4), width (k), num_classes, in_chans, norm, act."""

    min_size = 4

    def __init__(self, depth: int = 16, width: int = 4, num_classes: int = 10, in_chans: int = 3,
                 norm: str = "groupnorm", act: str = "relu"):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.in_chans, self.num_classes = in_chans, num_classes
        self.stem = nn.Sequential(conv3x3(in_chans, widths[0]), act_f(), norm_f(widths[0]))
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, norm_f, act_f))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.pool(self.blocks(self.stem(x)))
