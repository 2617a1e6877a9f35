"""U-Nets for DP-SGD: the plain U-Net with per-sample normalization, and an equivariant U-Net on escnn.

Both follow Ronneberger et al. 2015: an encoder of ``depth`` max-pooling stages and a decoder that upsamples,
concatenates the encoder's features of the same resolution (skip connection) and convolves; a 1x1 conv gives
per-pixel logits. Every conv unit is ``conv -> norm -> act`` with a per-sample normalization (GroupNorm by
default: statistics per sample over groups of channels and all positions), never batch statistics. Upsampling
is bilinear (no parameters; no transposed conv, which avoids checkerboard artefacts and a layer opacus has no
grad sampler for). Level ``l`` has ``width * 2**l`` channels; H and W must be multiples of ``2**depth``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooSegmenter
from zoo.nn.equivariant import R2Conv, field_norm_layer, fields_for, group_pool, gspace, regular_type, trivial_type
from zoo.nn.layers import double_conv, get_act_layer, get_norm_layer, upsample2x


def unet_forward(x: torch.Tensor, encoder: nn.ModuleList, decoder: nn.ModuleList) -> torch.Tensor:
    """Encoder blocks with 2x2 max pooling between them, then decoder blocks on ``cat(upsample(x), skip)``."""
    skips = []
    for i, block in enumerate(encoder):
        x = block(F.max_pool2d(x, 2) if i else x)
        skips.append(x)
    for block, skip in zip(decoder, reversed(skips[:-1])):
        x = block(torch.cat([upsample2x(x), skip], 1))
    return x


@register_family("unet")
class UNet(ZooSegmenter):
    """U-Net. Args: width (channels of the first level), depth (max-pooling stages), num_classes, in_chans,
    norm (:func:`zoo.nn.layers.get_norm_layer`), act, ws (weight-standardized convs)."""

    def __init__(self, width: int = 16, depth: int = 4, num_classes: int = 2, in_chans: int = 1,
                 norm: str = "groupnorm", act: str = "relu", ws: bool = False):
        super().__init__()
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        chans = [width * 2 ** level for level in range(depth + 1)]
        self.in_chans, self.num_classes, self.size_multiple = in_chans, num_classes, 2 ** depth
        self.encoder = nn.ModuleList([double_conv(c_in, c, norm_f, act_f, ws)
                                      for c_in, c in zip([in_chans, *chans[:-1]], chans)])
        self.decoder = nn.ModuleList([double_conv(chans[lv + 1] + chans[lv], chans[lv], norm_f, act_f, ws)
                                      for lv in reversed(range(depth))])
        self.num_features = chans[0]
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward_features(self, x):
        return unet_forward(x, self.encoder, self.decoder)


class EqDoubleConv(nn.Sequential):
    """Two ``R2Conv 3x3 -> field norm -> act`` units, ``in_type -> out_type -> out_type`` (out: regular fields)."""

    def __init__(self, in_type, out_type, norm, act):
        size = out_type.gspace.fibergroup.order()
        super().__init__(R2Conv(in_type, out_type, 3, padding=1), norm(len(out_type), size), act(),
                         R2Conv(out_type, out_type, 3, padding=1), norm(len(out_type), size), act())


@register_family("eq-unet")
class EqUNet(ZooSegmenter):
    """Equivariant U-Net: the U-Net above on regular fields of ``group`` (escnn gspace: 'c4', 'd4', ...).

    Input: ``in_chans`` trivial fields (the image); every feature map: regular fields of the group, level ``l``
    with ``fields_for(width * 2**l, |G|)`` of them (parameter count close to the plain U-Net's). Convs are
    R2Convs, norms per-sample field norms (:func:`zoo.nn.equivariant.field_norm_layer`), the activation pointwise.
    Max pooling 2x2, bilinear upsampling and concatenation of regular fields commute with the group's grid
    actions (90-degree rotations, and flips for D_N) on even grids, and group pooling (max over each field)
    before the 1x1 head gives invariant per-pixel features. So the mask is exactly equivariant:
    ``model(g x) = g model(x)`` for those actions (``equivariance_group``), H and W multiples of ``2**depth``.
    """

    def __init__(self, group: str = "d4", width: int = 16, depth: int = 4, num_classes: int = 2, in_chans: int = 1,
                 norm: str = "fieldgroupnorm", norm_groups: int = 16, affine: bool = True, act: str = "relu"):
        super().__init__()
        gs = gspace(group)
        order = gs.fibergroup.order()
        norm_f, act_f = field_norm_layer(norm, norm_groups, affine), get_act_layer(act)
        fields = [fields_for(width * 2 ** level, order) for level in range(depth + 1)]
        self.group = self.equivariance_group = group
        self.in_chans, self.num_classes, self.size_multiple, self.field_size = in_chans, num_classes, 2 ** depth, order
        ins = [trivial_type(gs, in_chans)] + [regular_type(gs, f) for f in fields[:-1]]
        self.encoder = nn.ModuleList([EqDoubleConv(t, regular_type(gs, f), norm_f, act_f)
                                      for t, f in zip(ins, fields)])
        self.decoder = nn.ModuleList([EqDoubleConv(regular_type(gs, fields[lv + 1] + fields[lv]),
                                                   regular_type(gs, fields[lv]), norm_f, act_f)
                                      for lv in reversed(range(depth))])
        self.num_features = fields[0]
        self.head = nn.Conv2d(fields[0], num_classes, 1)

    def forward_features(self, x):
        return group_pool(unet_forward(x, self.encoder, self.decoder), self.field_size)
