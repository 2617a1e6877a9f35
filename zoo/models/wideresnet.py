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

import copy

import torch
from torch import nn

from zoo.models import register_family
from zoo.models._base import ZooClassifier
from zoo.nn.layers import WSConv2d, conv3x3, get_act_layer, get_norm_layer, standardize
from zoo.nn.sparse import HardConcreteGate, register_pruner


class WideBasicBlock(nn.Module):
    """``x -> GN(act(conv3x3(x))) [-> gate] -> GN(act(conv3x3(.))) [-> branch gate] + shortcut(x)``; the
    shortcut is a 1x1 WS conv when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm, act, l0: bool = False, l0_blocks: bool = False,
                 drop_rate: float = 0.3, gate_scale: float = 1.0):
        super().__init__()
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
        self.shortcut = (
            WSConv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        h = self.gate1(self.norm1(self.act1(self.conv1(x))))
        h = self.branch_gate(self.norm2(self.act2(self.conv2(h))))
        return h + self.shortcut(x)


@register_family("wideresnet")
class WideResNet(ZooClassifier):
    """WRN-``depth``-``width``. Args: depth (6n+4), width (k), num_classes, in_chans, norm, act; L0 variant:
    l0 (channel gates), l0_blocks (branch gates), l0_drop_rate (initial closed-gate probability), l0_lambda
    (Louizos et al.'s lambda: the price of a kept parameter against the mean loss of one sample, divided by N),
    l0_gate_scale (DP-SGD trains log_alpha / scale: the gates' share of the clipping budget; :mod:`zoo.nn.sparse`)."""

    min_size = 4

    def __init__(self, depth: int = 16, width: int = 4, num_classes: int = 10, in_chans: int = 3,
                 norm: str = "groupnorm", act: str = "relu", l0: bool = False, l0_blocks: bool = False,
                 l0_drop_rate: float = 0.3, l0_lambda: float = 0.0, l0_gate_scale: float = 1.0):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        norm_f, act_f = get_norm_layer(norm), get_act_layer(act)
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.in_chans, self.num_classes, self.l0_lambda = in_chans, num_classes, l0_lambda
        self.stem = nn.Sequential(conv3x3(in_chans, widths[0]), act_f(), norm_f(widths[0]))
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, norm_f, act_f,
                                             l0, l0_blocks, l0_drop_rate, l0_gate_scale))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x):
        return self.pool(self.blocks(self.stem(x)))


class _Constant(nn.Module):
    """A residual branch whose every channel was closed: it outputs ``norm2``'s bias (GroupNorm of zeros)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", bias.detach().clone().view(1, -1, 1, 1))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1, *x.shape[2:])


class _PrunedBlock(nn.Module):
    """``branch(x) + shortcut(x)``, or the shortcut alone when the branch was closed."""

    def __init__(self, branch: nn.Module | None, shortcut: nn.Module):
        super().__init__()
        self.branch, self.shortcut = branch, shortcut

    def forward(self, x):
        s = self.shortcut(x)
        return s if self.branch is None else self.branch(x) + s


def _baked(conv: nn.Conv2d, in_keep: torch.Tensor) -> nn.Conv2d:
    """A plain Conv2d holding ``conv``'s (standardized, for a WS conv) filter restricted to the kept inputs."""
    w = standardize(conv.weight, conv.eps) if isinstance(conv, WSConv2d) else conv.weight
    w = w[:, in_keep]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, bias=False).to(w)
    new.weight.data.copy_(w)
    return new


def _folded_norm(norm: nn.GroupNorm, keep: torch.Tensor, scale: torch.Tensor) -> nn.GroupNorm:
    """``norm`` restricted to the kept channels (its groups must be single channels, or whole kept groups), with
    the gate values folded into its affine."""
    k = int(keep.sum())
    groups = k if norm.num_groups == norm.num_channels else norm.num_groups
    new = nn.GroupNorm(groups, k, norm.eps).to(norm.weight)
    new.weight.data.copy_(norm.weight[keep] * scale[keep])
    new.bias.data.copy_(norm.bias[keep] * scale[keep])
    return new


@register_pruner(WideResNet)
def prune_wideresnet(model: WideResNet):
    """Remove the closed channels of each block's first conv (conv1 outputs, norm1, conv2 inputs) and the
    branches whose branch gate is closed; fold open gates into norm1 / norm2. WS convs whose input channels
    shrink are baked into plain convs with the standardized filter (standardization mixes input channels)."""
    small, kept = copy.deepcopy(model), []
    for i, blk in enumerate(small.blocks):
        gate1 = blk.gate1.gates()[0] if isinstance(blk.gate1, HardConcreteGate) else torch.ones(blk.conv1.out_channels)
        zb = blk.branch_gate.gates()[0, 0] if isinstance(blk.branch_gate, HardConcreteGate) else torch.ones(())
        keep = gate1 > 0
        kept.append({"block": i, "channels": int(keep.sum()), "of": keep.numel(), "branch_open": bool(zb > 0)})
        stride = blk.conv1.stride[0]
        if zb == 0:
            small.blocks[i] = _PrunedBlock(None, blk.shortcut)
            continue
        if keep.any():
            norm2 = copy.deepcopy(blk.norm2)
            norm2.weight.data.mul_(zb)
            norm2.bias.data.mul_(zb)
            conv1 = WSConv2d(blk.conv1.in_channels, int(keep.sum()), 3, stride=stride, padding=1, bias=False,
                             eps=blk.conv1.eps).to(blk.conv1.weight)
            conv1.weight.data.copy_(blk.conv1.weight[keep])  # WS is per output channel: unaffected
            branch = nn.Sequential(conv1, blk.act1, _folded_norm(blk.norm1, keep, gate1), _baked(blk.conv2, keep),
                                   blk.act2, norm2)
        else:
            branch = _Constant(blk.norm2.bias * zb)
        small.blocks[i] = _PrunedBlock(branch, blk.shortcut)
    return small, kept
