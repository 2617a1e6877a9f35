"""DeepLabv3+ for DP-SGD (Chen et al. 2018, arXiv:1802.02611): atrous spatial pyramid pooling (ASPP) on a dilated
residual encoder, and a light decoder that refines the ASPP output with stride-4 low-level features.

Architecture:

* encoder: a small ResNet-18-style encoder of basic residual blocks (:class:`zoo.models.linknet.ResNetEncoder`:
  stem ``conv 7x7 stride 2 -> norm -> act``, ``maxpool 3x3 stride 2``, four stages of ``layers`` blocks with
  ``width * (2, 4, 8, 16)`` channels, i.e. half of ResNet-18's). Output stride 8: stage 2 has stride 2, and stages
  3 and 4 replace their stride by dilation 2 and 4 (every 3x3 conv of the stage).
* ASPP on the stride-8 feature, ``width * 8`` channels per branch: a ``conv 1x1``, three ``conv 3x3`` with
  dilation ``rates``, each ``-> norm -> act``; an image-pooling branch ``global average pooling -> conv 1x1 -> norm
  -> act -> bilinear upsampling`` to the feature size; concatenation ``-> conv 1x1 -> norm -> act``.
* decoder: the ASPP output upsampled bilinearly (x2) to the stride-4 low-level feature (stage 1's output), which
  is reduced by ``conv 1x1 -> norm -> act`` to ``width * 3`` channels (48 at width 16, as in the paper);
  concatenation, two ``conv 3x3 -> norm -> act`` units (``width * 8`` channels), bilinear upsampling to the input
  size, then the 1x1 conv ``head`` (a 1x1 conv commutes with bilinear upsampling, so this equals the paper's
  classifier followed by x4 upsampling).

Default ``rates=(2, 4, 6)``: our crops are small (a 256 crop is a 32x32 feature map at output stride 8), so the
paper's rates (6, 12, 18 at output stride 16; doubled at output stride 8) would see mostly padding; the ratios are
kept. Channel counts are smaller than the paper's (ASPP and decoder 256, ResNet-101 encoder) to stay at a few
million parameters, which suits DP-SGD (noise grows with the dimension).

Changes for DP: BatchNorm -> a per-sample normalization (:func:`zoo.nn.layers.get_norm_layer`, GroupNorm by default;
no batch statistics). The image-pooling branch normalizes a ``[B, C, 1, 1]`` map: a norm whose groups hold a
single channel (instance norm, or GroupNorm with as many groups as channels) would output a constant there, so
that branch always uses ``get_norm_layer("layernorm")``, a GroupNorm with one group over its ``width * 8``
channels (per sample). No dropout, so the forward is deterministic. Non-inplace activations; every trainable
layer is an ``nn.Conv2d`` or ``nn.GroupNorm``, each used once per forward. H and W must be multiples of 8.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooSegmenter
from zoo.models.linknet import ResNetEncoder
from zoo.nn.layers import conv_norm_act, get_act_layer, get_norm_layer


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``conv 1x1``, one dilated ``conv 3x3`` per rate and image pooling, each
    ``cin -> cout`` with ``norm -> act``; concatenated and projected by ``conv 1x1 -> norm -> act``."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], norm: Callable[[int], nn.Module],
                 act: Callable[[], nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList([conv_norm_act(cin, cout, norm, act, kernel_size=1),
                                       *[conv_norm_act(cin, cout, norm, act, dilation=r) for r in rates]])
        # a per-sample norm of the pooled [B, C, 1, 1] map: one group over all channels (see the module docstring)
        self.pool = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), get_norm_layer("layernorm")(cout), act())
        self.project = conv_norm_act((len(rates) + 2) * cout, cout, norm, act, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _resize(self.pool(x.mean((2, 3), keepdim=True)), x.shape[-2:])
        return self.project(torch.cat([*[branch(x) for branch in self.branches], pooled], 1))


@register_family("deeplabv3plus")
class DeepLabV3Plus(ZooSegmenter):
    """DeepLabv3+. Args: width (encoder stages have ``width * (2, 4, 8, 16)`` channels, ASPP and decoder
    ``width * 8``, the reduced low-level feature ``width * 3``), layers (basic blocks per encoder stage), rates
    (ASPP dilation rates at output stride 8), num_classes, in_chans, norm (:func:`zoo.nn.layers.get_norm_layer`), act."""

    def __init__(self, width: int = 16, layers: Sequence[int] = (2, 2, 2, 2), rates: Sequence[int] = (2, 4, 6),
                 num_classes: int = 2, in_chans: int = 1, norm: str = "groupnorm", act: str = "relu"):
        super().__init__()
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        layers, rates = tuple(layers), tuple(rates)
        if len(layers) != 4:
            raise ValueError(f"the encoder has 4 stages; layers must have 4 entries, got {list(layers)}")
        chans = [width * 2, width * 4, width * 8, width * 16]
        aspp, low = width * 8, width * 3
        self.in_chans, self.num_classes, self.size_multiple = in_chans, num_classes, 8
        self.encoder = ResNetEncoder(in_chans, chans, layers, norm_f, act_f, strides=(1, 2, 1, 1),
                                     dilations=(1, 1, 2, 4))
        self.aspp = ASPP(chans[-1], aspp, rates, norm_f, act_f)
        self.low_level = conv_norm_act(chans[0], low, norm_f, act_f, kernel_size=1)
        self.decoder = nn.Sequential(conv_norm_act(aspp + low, aspp, norm_f, act_f),
                                     conv_norm_act(aspp, aspp, norm_f, act_f))
        self.num_features = aspp
        self.head = nn.Conv2d(aspp, num_classes, 1)

    def forward_features(self, x):
        feats = self.encoder(x)  # [stride-4 stage input, stage outputs at strides 4, 8, 8, 8]
        low = self.low_level(feats[1])
        high = _resize(self.aspp(feats[4]), low.shape[-2:])
        return _resize(self.decoder(torch.cat([high, low], 1)), x.shape[-2:])
