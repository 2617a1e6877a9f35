"""Equivariant ResNet-9 (Hölzl, Rueckert, Kaissis 2023) in the ScaleNorm layout, DP-safe.

Same layout as :mod:`zoo.models.resnet9`, with escnn R2Conv on regular fields of a group G acting on the plane
(C_N rotations or D_N rotations and flips), field GroupNorm (per sample, groups of whole fields) after each
conv and after each residual sum, Mish (pointwise, so equivariant on regular fields), 2x2 max pooling, then
group pooling (max over each field's |G| channels) and global max pooling: invariant features before a linear
head. The logits are invariant under the grid actions of G (90-degree rotations, flips) on inputs whose size
is a multiple of 8.

Width rule (Hölzl et al.'s code): a stage of ``c`` channels in the plain network gets
``round(c * sqrt(1.5 |G|) / |G|)`` regular fields, so parameter counts stay comparable across groups.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from ..eq_layers import FieldGroupNorm, R2Conv, group_pool, gspace, regular_type, trivial_type
from ..layers import get_act_layer
from ..registry import register_family
from ._base import ZooClassifier


def fields_for(channels: int, order: int) -> int:
    return max(1, round(channels * math.sqrt(1.5 * order) / order))


class _EqBlock(nn.Module):
    """R2Conv -> FieldGroupNorm -> act [-> 2x2 max pool]."""

    def __init__(self, in_type, out_type, act, norm_groups, affine, pool=False):
        super().__init__()
        size = out_type.gspace.fibergroup.order()
        self.conv = R2Conv(in_type, out_type, 3, padding=1)
        self.norm = FieldGroupNorm(len(out_type), size, norm_groups, affine=affine)
        self.act, self.pool = act(), pool

    def forward(self, x):
        x = self.act(self.norm(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool else x


class _EqResidual(nn.Module):
    """``x -> FieldGroupNorm(x + block(block(x)))``."""

    def __init__(self, ftype, act, norm_groups, affine):
        super().__init__()
        self.body = nn.Sequential(_EqBlock(ftype, ftype, act, norm_groups, affine),
                                  _EqBlock(ftype, ftype, act, norm_groups, affine))
        self.norm = FieldGroupNorm(len(ftype), ftype.gspace.fibergroup.order(), norm_groups, affine=affine)

    def forward(self, x):
        return self.norm(x + self.body(x))


@register_family("eq-resnet9")
class EqResNet9(ZooClassifier):
    """Args: group ('c4', 'c8', 'd4', 'd8', ...), width (plain base channels, 64), num_classes, in_chans,
    act, norm_groups (field groups per GroupNorm), affine (GroupNorm affine; Hölzl et al. use none)."""

    min_size = 8

    def __init__(self, group: str = "d4", width: int = 64, num_classes: int = 10, in_chans: int = 3,
                 act: str = "mish", norm_groups: int = 16, affine: bool = False):
        super().__init__()
        gs = gspace(group)
        order = gs.fibergroup.order()
        self.group, self.in_chans, self.num_classes, self.field_size = group, in_chans, num_classes, order
        f = [fields_for(c, order) for c in (width, 2 * width, 4 * width, 8 * width)]
        t = [regular_type(gs, k) for k in f]
        act_f = get_act_layer(act)
        blk = lambda i, o, pool=False: _EqBlock(i, o, act_f, norm_groups, affine, pool)  # noqa: E731
        self.features = nn.Sequential(
            blk(trivial_type(gs, in_chans), t[0]),
            blk(t[0], t[1], pool=True),
            _EqResidual(t[1], act_f, norm_groups, affine),
            blk(t[1], t[2], pool=True),
            blk(t[2], t[3], pool=True),
            _EqResidual(t[3], act_f, norm_groups, affine),
        )
        self.num_features = f[3]
        self.head = nn.Linear(f[3], num_classes)

    def forward_features(self, x):
        return group_pool(self.features(x), self.field_size).amax((2, 3))
