"""Equivariant WideResNet for DP-SGD: zoo's WRN (TAN's Conv -> act -> norm layout) on regular fields of a group.

The group G acts on the plane (C_N rotations or D_N rotations and flips; escnn ``gspace``). Every feature map
is a stack of regular fields; convolutions are escnn R2Convs between them (3x3, and 1x1 on the shortcut when
the shape changes); normalizations are per-sample field norms (:func:`zoo.nn.equivariant.field_norm_layer`);
the activation is pointwise, so it commutes with the permutation action of regular fields. Group pooling (max
over each field's channels) and global average pooling give invariant features before a linear head.

Downsampling: a stride-2 convolution samples the even grid positions, which a 90-degree rotation of an even-sized
image does not map onto themselves, so strided convs are only approximately equivariant (escnn's own WRN
accepts that). zoo instead average-pools 2x2 at the start of each downsampling block and convolves with stride 1:
same output resolution and cost, and the logits are exactly invariant under the group's grid actions on
inputs whose size is a multiple of 4.

Widths: stage ``c`` plain channels -> ``fields_for(c, |G|)`` regular fields (Hölzl et al.'s rule), so the
parameter count stays close to the plain WRN-depth-k's.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooClassifier
from zoo.nn.equivariant import R2Conv, field_norm_layer, fields_for, group_pool, gspace, regular_type, trivial_type
from zoo.nn.layers import get_act_layer


class EqWideBasicBlock(nn.Module):
    """``x [-> avgpool 2x2] -> norm(act(R2Conv3x3)) -> norm(act(R2Conv3x3)) + shortcut``, ``in_type ->
    out_type`` (regular fields); the shortcut is a 1x1 R2Conv when the field count changes."""

    def __init__(self, in_type, out_type, downsample: bool, norm, act):
        super().__init__()
        size = out_type.gspace.fibergroup.order()
        self.downsample = downsample
        self.conv1, self.act1, self.norm1 = R2Conv(in_type, out_type, 3, padding=1), act(), norm(len(out_type), size)
        self.conv2, self.act2, self.norm2 = R2Conv(out_type, out_type, 3, padding=1), act(), norm(len(out_type), size)
        self.shortcut = R2Conv(in_type, out_type, 1, padding=0) if in_type != out_type else nn.Identity()

    def forward(self, x):
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        h = self.norm1(self.act1(self.conv1(x)))
        h = self.norm2(self.act2(self.conv2(h)))
        return h + self.shortcut(x)


@register_family("eq-wideresnet")
class EqWideResNet(ZooClassifier):
    """Equivariant WRN-``depth``-``width``. Args: group ('c4', 'c8', 'd4', 'd8', ...), depth (6n+4), width (k;
    plain widths 16, 16k, 32k, 64k become regular fields by :func:`zoo.nn.equivariant.fields_for`), num_classes,
    in_chans, norm (``'fieldgroupnorm'`` or ``'fieldnorm'``), norm_groups, affine, act.

    ``invariance_group``: the logits are invariant under this group's grid actions (inputs a multiple of 4).
    """

    min_size = 4
    size_multiple = 4  # two stride-2 stages: the logits are exactly invariant only when each sees an even size

    def __init__(self, group: str = "d4", depth: int = 16, width: int = 4, num_classes: int = 10,
                 in_chans: int = 3, norm: str = "fieldgroupnorm", norm_groups: int = 16, affine: bool = True,
                 act: str = "relu"):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        gs = gspace(group)
        order = gs.fibergroup.order()
        norm_f, act_f = field_norm_layer(norm, norm_groups, affine), get_act_layer(act)
        types = [regular_type(gs, fields_for(c, order)) for c in (16, 16 * width, 32 * width, 64 * width)]
        self.group = self.invariance_group = group
        self.in_chans, self.num_classes, self.field_size = in_chans, num_classes, order
        self.stem = nn.Sequential(R2Conv(trivial_type(gs, in_chans), types[0], 3, padding=1), act_f(),
                                  norm_f(len(types[0]), order))
        blocks, cin = [], types[0]
        for stage, cout in enumerate(types[1:]):
            for i in range(n):
                blocks.append(EqWideBasicBlock(cin, cout, stage > 0 and i == 0, norm_f, act_f))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.num_features = len(cin)
        self.head = nn.Linear(len(cin), num_classes)

    def forward_features(self, x):
        return group_pool(self.blocks(self.stem(x)), self.field_size).mean((2, 3))
