"""WideResNet for DP-SGD (De et al. 2022; Sander et al. 2023, TAN), optionally L0-sparse (Louizos et al. 2018).

Weight-standardized 3x3 convolutions, GroupNorm(16) and the activation *before* the normalization
(Conv -> act -> GN), which TAN found better than Conv -> GN -> act under DP. No batch statistics anywhere.
Depth ``6n + 4``, widths ``16, 16k, 32k, 64k``; invariant global average pooling before a linear head.

L0 variant (``l0=True``): a hard-concrete gate (:mod:`zoo.nn.sparse`) on each output channel of the first conv of
every block, after its normalization, which is then per channel (GroupNorm with one channel per group): so a
closed gate's channel can be removed without changing the statistics of the others, and :func:`zoo.prune`
is exact. ``l0_blocks=True`` adds one gate on each whole residual branch. ``l0_lambda`` is Louizos et al.'s
``lambda``: the penalty charges each gate ``lambda / N`` per parameter it keeps (its ``cost``: the conv1 filter,
the norm1 affine and the conv2 input slice of a channel; every parameter of a branch), and its data-free
gradient is added after the noise (:mod:`zoo.nn.sparse`).
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooClassifier
from zoo.nn.layers import WSConv2d, conv3x3, get_act_layer, get_norm_layer, standardize
from zoo.nn.sparse import HardConcreteGate, register_pruner


class WideBasicBlock(nn.Module):
    """``x -> GN(act(conv3x3(x))) [-> gate] -> GN(act(conv3x3(.))) [-> branch gate] + shortcut(x)``; the
    shortcut is a 1x1 WS conv when the shape changes.

    Pruned form (``mid`` given, :func:`prune_wideresnet`): no gates, ``mid`` channels between the two convs,
    ``norm1`` per channel and ``conv2`` a plain conv (it holds the standardized filter of the trained block,
    restricted to the kept channels: standardization mixes input channels, so the restriction is not itself a
    standardized filter). ``mid = 0``: the branch is a constant, the per-channel buffer ``constant`` (``norm2``'s
    bias, GroupNorm of zeros, times the branch gate; zero for a closed branch); it has no parameters."""

    def __init__(self, cin: int, cout: int, stride: int, norm, act, l0: bool = False, l0_blocks: bool = False,
                 drop_rate: float = 0.3, gate_scale: float = 1.0, mid: int | None = None):
        super().__init__()
        if mid is None:
            self.conv1, self.act1 = conv3x3(cin, cout, stride), act()
            self.norm1 = nn.GroupNorm(cout, cout) if l0 else norm(cout)  # per channel: pruning stays exact
            self.conv2, self.act2, self.norm2 = conv3x3(cout, cout), act(), norm(cout)
            per_channel = sum(p[0].numel() for p in self.conv1.parameters()) + sum(p[0].numel() for p in
                                                                                   self.norm1.parameters())
            per_channel += self.conv2.weight[:, 0].numel()  # the input slice of conv2 that reads the channel
            self.gate1 = HardConcreteGate(cout, drop_rate, cost=per_channel, scale=gate_scale) if l0 else nn.Identity()
            branch = sum(p.numel() for m in (self.conv1, self.norm1, self.conv2, self.norm2) for p in m.parameters())
            self.branch_gate = (HardConcreteGate(1, drop_rate, cost=branch, scale=gate_scale) if l0_blocks
                                else nn.Identity())
        elif mid > 0:  # the pruned form
            self.conv1, self.act1, self.norm1 = conv3x3(cin, mid, stride), act(), nn.GroupNorm(mid, mid)
            self.conv2, self.act2, self.norm2 = conv3x3(mid, cout, ws=False), act(), norm(cout)
            self.gate1, self.branch_gate = nn.Identity(), nn.Identity()
        else:
            self.conv1 = None
            self.register_buffer("constant", torch.zeros(1, cout, 1, 1))
        self.shortcut = (  # registered last: the parameters' order (and so a seeded run's noise) is unchanged
            WSConv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        if self.conv1 is None:
            return self.shortcut(x) + self.constant
        h = self.gate1(self.norm1(self.act1(self.conv1(x))))
        h = self.branch_gate(self.norm2(self.act2(self.conv2(h))))
        return h + self.shortcut(x)


@register_family("wideresnet")
class WideResNet(ZooClassifier):
    """WRN-``depth``-``width``. Args: depth (6n+4), width (k), num_classes, in_chans, norm, act; L0 variant:
    l0 (channel gates), l0_blocks (branch gates), l0_drop_rate (initial closed-gate probability), l0_lambda
    (Louizos et al.'s lambda: the price of a kept parameter against the mean loss of one sample, divided by N),
    l0_gate_scale (DP-SGD trains log_alpha / scale: the gates' share of the clipping budget; :mod:`zoo.nn.sparse`).
    Pruned form: ``mid_channels``, one count per block (``3n`` of them) of the channels between its two convs
    (:class:`WideBasicBlock`'s ``mid``), as :func:`zoo.prune` writes them; a network without gates."""

    min_size = 4

    def __init__(self, depth: int = 16, width: int = 4, num_classes: int = 10, in_chans: int = 3,
                 norm: str = "groupnorm", act: str = "relu", l0: bool = False, l0_blocks: bool = False,
                 l0_drop_rate: float = 0.3, l0_lambda: float = 0.0, l0_gate_scale: float = 1.0,
                 mid_channels: list[int] | None = None):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        widths = [16, 16 * width, 32 * width, 64 * width]
        outs = [w for w in widths[1:] for _ in range(n)]
        if mid_channels is not None:
            if l0 or l0_blocks:
                raise ValueError("mid_channels describes a pruned WideResNet, which has no gates; drop l0 / l0_blocks")
            mid_channels = list(mid_channels)
            if len(mid_channels) != len(outs) or any(isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= c
                                                     for m, c in zip(mid_channels, outs)):
                raise ValueError(f"mid_channels must give one int per block ({len(outs)} for depth {depth}), each "
                                 f"between 0 and the block's width {outs}; got {mid_channels}")
        self.arch = {"depth": depth, "width": width, "norm": norm, "act": act}  # what rebuilds it (zoo.prune)
        if mid_channels is not None:
            self.arch["mid_channels"] = mid_channels
        self.in_chans, self.num_classes, self.l0_lambda = in_chans, num_classes, l0_lambda
        self.stem = nn.Sequential(conv3x3(in_chans, widths[0]), act_f(), norm_f(widths[0]))
        blocks, cin = [], widths[0]
        for i, cout in enumerate(outs):
            blocks.append(WideBasicBlock(cin, cout, 2 if (i % n == 0 and i >= n) else 1, norm_f, act_f, l0, l0_blocks,
                                         l0_drop_rate, l0_gate_scale, None if mid_channels is None else
                                         mid_channels[i]))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.pool(self.blocks(self.stem(x)))


@register_pruner(WideResNet)
def prune_wideresnet(model: WideResNet):
    """The pruned form of a gated WideResNet (``mid_channels``): each block keeps the channels of its first conv
    whose test-time gate is open (conv1 outputs, norm1, conv2 inputs), with the gate values folded into norm1's
    affine and the branch gate into norm2's; conv2 becomes a plain conv holding the standardized filter restricted
    to the kept channels (standardization mixes input channels). A block with no kept channel, or a closed branch
    gate, becomes the constant its branch then outputs."""
    if not all(isinstance(blk.gate1, HardConcreteGate) for blk in model.blocks):
        raise ValueError("zoo.prune needs channel gates (l0=True: norm1 is then per channel, so removing a channel "
                         "leaves the others' statistics unchanged); this WideResNet has branch gates only")
    mids, kept, gates = [], [], []
    for i, blk in enumerate(model.blocks):
        gate1 = blk.gate1.gates()[0]
        zb = blk.branch_gate.gates()[0, 0] if isinstance(blk.branch_gate, HardConcreteGate) else torch.ones(())
        gates.append((gate1, zb))
        mids.append(int(((gate1 > 0) & (zb > 0)).sum()))
        kept.append({"block": i, "channels": int((gate1 > 0).sum()), "of": gate1.numel(), "branch_open": bool(zb > 0)})
    p = next(model.parameters())
    small = WideResNet(**model.arch, num_classes=model.num_classes, in_chans=model.in_chans,
                       mid_channels=mids).to(p)
    small.stem.load_state_dict(model.stem.state_dict())
    small.head.load_state_dict(model.head.state_dict())
    for blk, new, mid, (gate1, zb) in zip(model.blocks, small.blocks, mids, gates):
        if not isinstance(blk.shortcut, nn.Identity):
            new.shortcut.load_state_dict(blk.shortcut.state_dict())
        if mid == 0:  # GroupNorm of zeros is its bias; a closed branch adds nothing
            new.constant.copy_((blk.norm2.bias * zb).view(1, -1, 1, 1))
            continue
        keep = gate1 > 0
        new.conv1.weight.copy_(blk.conv1.weight[keep])  # WS is per output channel: unaffected
        new.norm1.weight.copy_(blk.norm1.weight[keep] * gate1[keep])
        new.norm1.bias.copy_(blk.norm1.bias[keep] * gate1[keep])
        w2 = standardize(blk.conv2.weight, blk.conv2.eps) if isinstance(blk.conv2, WSConv2d) else blk.conv2.weight
        new.conv2.weight.copy_(w2[:, keep])
        new.norm2.weight.copy_(blk.norm2.weight * zb)
        new.norm2.bias.copy_(blk.norm2.bias * zb)
    return small, kept, small.arch
