"""LinkNet for DP-SGD (Chaurasia & Culurciello 2017, arXiv:1707.03718): a ResNet-18 encoder whose features are
added ("linked") to a light decoder's, instead of concatenated as in the U-Net.

Architecture, at width 16 the paper's ResNet-18 LinkNet (channel counts ``width * (4, 8, 16, 32)`` = 64..512):

* encoder (:class:`ResNetEncoder`): stem ``conv 7x7 stride 2 -> norm -> act``, ``maxpool 3x3 stride 2``; four
  stages of ``layers`` (default two) basic residual blocks (:class:`BasicBlock`); the first block of stages 2-4 has
  stride 2 and a ``conv 1x1 stride 2 -> norm`` shortcut. Stage outputs ``e1..e4`` have strides 4, 8, 16, 32.
* decoder blocks (:class:`DecoderBlock`, ``m -> n`` channels): ``conv 1x1 m -> m/4``, ``x2 bilinear upsampling
  then conv 3x3 m/4 -> m/4``, ``conv 1x1 m/4 -> n``, each conv followed by ``norm -> act``. As in the authors'
  ResNet-18 code, the output of decoder block ``i`` is added to the input of encoder stage ``i``:
  ``d4 = e3 + D4(e4)``, ``d3 = e2 + D3(d4)``, ``d2 = e1 + D2(d3)``, ``d1 = maxpool(stem(x)) + D1(d2)``; ``D1`` keeps the
  resolution (stride 4, like ResNet-18's first stage), ``D2..D4`` upsample x2.
* classifier: ``x2 upsampling + conv 3x3 -> norm -> act`` (``width * 4 -> width * 2`` channels),
  ``conv 3x3 -> norm -> act``, ``x2 bilinear upsampling`` to the input size, then the 1x1 conv ``head``.

Changes for DP: BatchNorm -> a per-sample normalization (:func:`zoo.nn.layers.get_norm_layer`, GroupNorm by
default); every transposed conv -> bilinear upsampling followed by a conv (opacus has no per-sample gradient for
``nn.ConvTranspose2d``, and this avoids checkerboard artefacts). The paper's last layer, a 2x2 stride-2
transposed conv to the classes, becomes bilinear x2 upsampling then the 1x1 head (a linear map commutes with
bilinear interpolation, so this is a 1x1 conv upsampled bilinearly). Non-inplace activations; every trainable
layer is an ``nn.Conv2d`` or ``nn.GroupNorm``, each used once per forward. H and W must be multiples of 32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooSegmenter
from zoo.nn.layers import conv_norm_act, get_act_layer, get_norm_layer, upsample2x


class BasicBlock(nn.Module):
    """ResNet basic block: ``conv 3x3 (stride, dilation) -> norm -> act -> conv 3x3 (dilation) -> norm``, plus the
    identity, or ``conv 1x1 (stride) -> norm`` when the stride or the channel count changes; then ``act``."""

    def __init__(self, cin: int, cout: int, norm: Callable[[int], nn.Module], act: Callable[[], nn.Module],
                 stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.norm1, self.act1 = norm(cout), act()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm2, self.act2 = norm(cout), act()
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet encoder of basic blocks: stem ``conv 7x7 stride 2 -> norm -> act`` then ``maxpool 3x3 stride 2``,
    then one stage per entry of ``chans`` with ``layers[s]`` blocks; the first block of stage ``s`` has stride
    ``strides[s]``, every 3x3 conv of stage ``s`` dilation ``dilations[s]``. ``forward`` returns the input of
    the first stage (the pooled stem output, stride 4) followed by every stage's output."""

    def __init__(self, in_chans: int, chans: Sequence[int], layers: Sequence[int], norm: Callable[[int], nn.Module],
                 act: Callable[[], nn.Module], strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        if not (len(chans) == len(layers) == len(strides) == len(dilations)) or min(layers) < 1:
            raise ValueError(f"need one channel count, stride, dilation and a positive number of blocks per stage, "
                             f"got chans={list(chans)}, layers={list(layers)}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, chans[0], 7, stride=2, padding=3, bias=False),
                                  norm(chans[0]), act())
        stages, cin = [], chans[0]
        for cout, n, stride, dilation in zip(chans, layers, strides, dilations):
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout, norm, act,
                                                     stride if b == 0 else 1, dilation) for b in range(n)]))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(self.stem(x), 3, stride=2, padding=1)
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class DecoderBlock(nn.Module):
    """LinkNet decoder block ``m -> n``: ``conv 1x1 m -> m/4``, (x2 bilinear upsampling if ``upsample``) then
    ``conv 3x3 m/4 -> m/4``, ``conv 1x1 m/4 -> n``; each conv followed by ``norm -> act``."""

    def __init__(self, m: int, n: int, norm: Callable[[int], nn.Module], act: Callable[[], nn.Module],
                 upsample: bool = True):
        super().__init__()
        mid = max(1, m // 4)
        self.upsample = upsample
        self.reduce = conv_norm_act(m, mid, norm, act, kernel_size=1)
        self.conv = conv_norm_act(mid, mid, norm, act)
        self.expand = conv_norm_act(mid, n, norm, act, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        return self.expand(self.conv(upsample2x(x) if self.upsample else x))


@register_family("linknet")
class LinkNet(ZooSegmenter):
    """LinkNet with a ResNet-18-style encoder. Args: width (encoder stages have ``width * (4, 8, 16, 32)``
    channels, the classifier ``width * 2``), layers (basic blocks per stage; ResNet-18: ``(2, 2, 2, 2)``),
    num_classes, in_chans, norm (:func:`zoo.nn.layers.get_norm_layer`), act."""

    def __init__(self, width: int = 16, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 2,
                 in_chans: int = 1, norm: str = "groupnorm", act: str = "relu"):
        super().__init__()
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        layers = tuple(layers)
        if len(layers) != 4:
            raise ValueError(f"LinkNet has 4 encoder stages; layers must have 4 entries, got {list(layers)}")
        chans = [width * 4, width * 8, width * 16, width * 32]
        self.in_chans, self.num_classes, self.size_multiple = in_chans, num_classes, 32
        self.encoder = ResNetEncoder(in_chans, chans, layers, norm_f, act_f)
        # decoders[s] maps stage s's output channels to those of stage s's input, to which its output is added
        self.decoders = nn.ModuleList([DecoderBlock(chans[s], chans[max(s - 1, 0)], norm_f, act_f, upsample=s > 0)
                                       for s in range(4)])
        self.classifier = nn.Sequential(conv_norm_act(chans[0], width * 2, norm_f, act_f),
                                        conv_norm_act(width * 2, width * 2, norm_f, act_f))
        self.num_features = width * 2
        self.head = nn.Conv2d(width * 2, num_classes, 1)

    def forward_features(self, x):
        feats = self.encoder(x)  # feats[s]: input of encoder stage s (s < 4); feats[4]: the deepest output
        d = feats[4]
        for s in reversed(range(4)):
            d = feats[s] + self.decoders[s](d)
        y = self.classifier[1](self.classifier[0](upsample2x(d)))
        return upsample2x(y)
