"""Equivariant ResNet-9 (Hölzl, Rueckert, Kaissis 2023) in the ScaleNorm layout, DP-safe.

Hölzl et al.'s layout: conv(c0) -> conv(c1)+pool -> residual(c1) + norm -> conv(c2)+pool -> [restriction to
the subgroup of half the rotation order] -> conv(c2)+pool -> residual(c2) + norm, on regular fields of a group
G acting on the plane (C_N rotations or D_N rotations and flips): escnn R2Conv, field GroupNorm (per sample,
groups of whole fields) after each conv and after each residual sum (ScaleNorm), Mish (pointwise, so
equivariant on permutation fields), 2x2 max pooling. Then group pooling (max over each field's channels) and
global average pooling: invariant features before a linear head (Hölzl et al. average-pool to 2x2 instead,
which is not invariant; zoo keeps the head invariant. Global max pooling learned markedly slower here). The logits are invariant under the grid actions of the
(restricted) group on inputs whose size is a multiple of 8.

Width rule (Hölzl et al.'s code): a stage of ``c`` plain channels gets ``int(c * sqrt(1.5 |G|) / |G|)`` regular
fields, so parameter counts stay comparable across groups.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooClassifier
from zoo.nn.equivariant import R2Conv, field_norm_layer, fields_for, group_pool, gspace, regular_type, trivial_type
from zoo.nn.layers import get_act_layer


class _EqBlock(nn.Module):
    """R2Conv -> field norm -> act [-> 2x2 max pool]."""

    def __init__(self, in_type, out_type, act, norm, pool=False):
        super().__init__()
        self.conv = R2Conv(in_type, out_type, 3, padding=1)
        self.norm = norm(len(out_type), out_type.gspace.fibergroup.order())
        self.act, self.pool = act(), pool

    def forward(self, x):
        x = self.act(self.norm(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool else x


class _EqResidual(nn.Module):
    """``x -> norm(x + block(block(x)))``."""

    def __init__(self, ftype, act, norm):
        super().__init__()
        self.body = nn.Sequential(_EqBlock(ftype, ftype, act, norm), _EqBlock(ftype, ftype, act, norm))
        self.norm = norm(len(ftype), ftype.gspace.fibergroup.order())

    def forward(self, x):
        return self.norm(x + self.body(x))


def _halve(group: str) -> str:
    n = int(group[1:])
    if n % 2:
        raise ValueError(f"cannot halve {group}: the rotation order must be even to restrict to half of it")
    return f"{group[0]}{n // 2}"


@register_family("eq-resnet9")
class EqResNet9(ZooClassifier):
    """Args: group ('c4', 'c8', 'd4', 'd8', ...), layout (plain channel counts of the three stages; Hölzl et al.
    use 16, 32, 64), restrict (the last stage works on the subgroup of half the rotation order, e.g. D4 -> D2,
    as Hölzl et al.'s "halved"), num_classes, in_chans, act, norm (``'fieldgroupnorm'`` or ``'fieldnorm'``, see
    :func:`zoo.nn.equivariant.field_norm_layer`), norm_groups (field groups per GroupNorm: the largest divisor of the
    field count not above it), affine (normalization affine; Hölzl et al. use none).

    ``invariance_group`` is the group the logits are invariant under: ``group``, or its halved subgroup when
    ``restrict`` is on.
    """

    min_size = 8
    size_multiple = 8  # three 2x2 max pools: the logits are exactly invariant only when each sees an even size

    def __init__(self, group: str = "d4", layout: tuple = (16, 32, 64), restrict: bool = True,
                 num_classes: int = 10, in_chans: int = 3, act: str = "mish", norm: str = "fieldgroupnorm",
                 norm_groups: int = 8, affine: bool = False):
        super().__init__()
        gs = gspace(group)
        order = gs.fibergroup.order()
        self.group, self.in_chans, self.num_classes = group, in_chans, num_classes
        f = [fields_for(c, order) for c in layout]
        t = [regular_type(gs, k) for k in f]
        act_f, norm_f = get_act_layer(act), field_norm_layer(norm, norm_groups, affine)
        blk = lambda i, o, pool=False: _EqBlock(i, o, act_f, norm_f, pool)  # noqa: E731
        last_in = t[2]
        self.invariance_group = group
        if restrict:
            self.invariance_group = _halve(group)
            n = int(group[1:])
            last_in = t[2].restrict((0, n // 2) if group[0] == "d" else n // 2)  # same tensor, subgroup's type
        sub = last_in.gspace
        t_last = regular_type(sub, fields_for(layout[2], sub.fibergroup.order()))
        self.field_size = sub.fibergroup.order()
        self.features = nn.Sequential(
            blk(trivial_type(gs, in_chans), t[0]),
            blk(t[0], t[1], pool=True),
            _EqResidual(t[1], act_f, norm_f),
            blk(t[1], t[2], pool=True),
            blk(last_in, t_last, pool=True),
            _EqResidual(t_last, act_f, norm_f),
        )
        self.num_features = len(t_last)
        self.head = nn.Linear(len(t_last), num_classes)

    def forward_features(self, x):
        return group_pool(self.features(x), self.field_size).mean((2, 3))
