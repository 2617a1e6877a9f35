"""U-Net++ for DP-SGD: the U-Net with nested, dense skip pathways (Zhou et al. 2018, arXiv:1807.10165).

Architecture (the paper's Fig. 1a, without deep supervision): a grid of nodes ``X^{i,j}``, ``i`` the level
(resolution ``1 / 2**i``, ``width * 2**i`` channels), ``j`` the position along the skip pathway.
``X^{i,0}`` is the U-Net encoder: ``X^{0,0} = block(x)``, ``X^{i,0} = block(maxpool2x2(X^{i-1,0}))``; every
other node fuses the nodes before it on its level with the upsampled node below:
``X^{i,j} = block(cat(X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1})))``. The segmentation is read from
``X^{0,depth}`` through a 1x1 conv head. ``block`` is the U-Net block, two ``conv 3x3 -> norm -> act`` units.

Changes for DP (the DP contract of zoo's models): the paper's BatchNorm is a per-sample normalization
(:func:`zoo.nn.layers.get_norm_layer`, GroupNorm by default), and the upsampling is bilinear
(:func:`zoo.nn.layers.upsample2x`; no transposed conv, which opacus has no per-sample gradient for). Every trainable
layer is an ``nn.Conv2d`` (or ``WSConv2d`` with ``ws``) or ``nn.GroupNorm``, each used once per forward.
H and W must be multiples of ``2**depth``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooSegmenter
from zoo.nn.layers import double_conv, get_act_layer, get_norm_layer, upsample2x


@register_family("unetpp")
class UNetPlusPlus(ZooSegmenter):
    """U-Net++. Args: width (channels of level 0; level ``i`` has ``width * 2**i``), depth (max-pooling levels),
    num_classes, in_chans, norm (:func:`zoo.nn.layers.get_norm_layer`), act, ws (weight-standardized convs).
    Node ``X^{i,j}`` is ``self.nodes[f"x{i}_{j}"]``."""

    def __init__(self, width: int = 16, depth: int = 4, num_classes: int = 2, in_chans: int = 1,
                 norm: str = "groupnorm", act: str = "relu", ws: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        chans = [width * 2 ** level for level in range(depth + 1)]
        self.depth = depth
        self.in_chans, self.num_classes, self.size_multiple = in_chans, num_classes, 2 ** depth
        self.nodes = nn.ModuleDict()
        for j in range(depth + 1):
            for i in range(depth + 1 - j):
                if j == 0:
                    cin = in_chans if i == 0 else chans[i - 1]
                else:
                    cin = j * chans[i] + chans[i + 1]
                self.nodes[f"x{i}_{j}"] = double_conv(cin, chans[i], norm_f, act_f, ws)
        self.num_features = chans[0]
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward_features(self, x):
        levels: list[list[torch.Tensor]] = []  # levels[i][j] = X^{i,j}
        for i in range(self.depth + 1):
            levels.append([self.nodes[f"x{i}_0"](F.max_pool2d(levels[i - 1][0], 2) if i else x)])
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                inputs = [*levels[i][:j], upsample2x(levels[i + 1][j - 1])]
                levels[i].append(self.nodes[f"x{i}_{j}"](torch.cat(inputs, 1)))
        return levels[0][self.depth]
