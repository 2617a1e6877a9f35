"""DP-safe building blocks shared by every model family.

Nothing here uses batch statistics: every normalization averages over the features of one sample only,
so a sample's output (and therefore its gradient) never depends on the other samples of the batch.
Every layer with trainable parameters has an exact per-sample gradient: opacus' own samplers, or for zoo's layers the
samplers registered at the end of this module, beside their layers (:mod:`zoo.dp.grad_sample` checks that each is there).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn

from zoo.nn.inputs import functorch_wrapped

__all__ = ["WSConv2d", "Scattering2D", "DataStandardize", "get_norm_layer", "get_act_layer", "NORM_LAYERS", "ACT_LAYERS"]


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardization (Qiao et al. 2019; used by De et al. 2022 for DP).

    The filter used in the forward pass is ``(w - mean) / sqrt(var + eps)``, with mean and (biased) variance
    taken per output channel over ``in_channels/groups x kH x kW``. It depends on the weights only, never on
    data, so it is DP-safe. Per-sample gradients are those of ``nn.Conv2d`` for the standardized filter,
    pulled back through the standardization (``zoo.dp.grad_sample``).
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return standardize(self.weight if weight is None else weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is not above ``at_most`` (number of groups for a GroupNorm)."""
    g = max(1, min(at_most, n))
    while n % g:
        g -= 1
    return g


def _group_norm(groups: int) -> Callable[[int], nn.Module]:
    def make(channels: int) -> nn.Module:
        return nn.GroupNorm(largest_divisor(channels, groups), channels)

    return make


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    # GroupNorm: mean/variance per sample over groups of channels and all spatial positions.
    "groupnorm": _group_norm(16),
    "groupnorm32": _group_norm(32),
    # LayerNorm over (C, H, W) of one sample: GroupNorm with a single group.
    "layernorm": lambda c: nn.GroupNorm(1, c),
    # InstanceNorm with affine: one group per channel, statistics over H x W of one sample.
    "instancenorm": lambda c: nn.GroupNorm(c, c),
}

ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,  # never in place: it would corrupt the activations opacus hooks keep
    "mish": nn.Mish,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def _lookup(table: dict, name: str, kind: str):
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {name!r}; zoo offers only per-sample (DP-safe) choices: {sorted(table)}. "
            "Batch statistics (BatchNorm) mix samples and break the per-sample sensitivity bound."
        ) from None


def get_norm_layer(name: str) -> Callable[[int], nn.Module]:
    """Return a factory ``channels -> module`` for a per-sample normalization (timm's ``get_norm_layer``).

    Only normalizations whose statistics come from a single sample are offered; ``'batchnorm'`` is refused.
    """
    return _lookup(NORM_LAYERS, name, "normalization")


def get_act_layer(name: str) -> Callable[[], nn.Module]:
    """Return a factory for an activation module (``'relu'``, ``'mish'``, ...)."""
    return _lookup(ACT_LAYERS, name, "activation")


def conv2d(cin: int, cout: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
           ws: bool = False) -> nn.Conv2d:
    """Bias-free conv with 'same' padding (odd kernels), weight-standardized with ``ws=True``."""
    cls = WSConv2d if ws else nn.Conv2d
    return cls(cin, cout, kernel_size, stride=stride, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
               bias=False)


def conv3x3(cin: int, cout: int, stride: int = 1, ws: bool = True) -> nn.Conv2d:
    return conv2d(cin, cout, 3, stride, ws=ws)


def conv_norm_act(cin: int, cout: int, norm: Callable[[int], nn.Module], act: Callable[[], nn.Module],
                  kernel_size: int = 3, dilation: int = 1, ws: bool = False) -> nn.Sequential:
    """``Conv(k x k, 'same' padding, no bias) -> norm -> act``: the conv unit of zoo's segmentation families
    (the norm is a per-sample one from :func:`get_norm_layer`; its bias makes the conv's redundant)."""
    return nn.Sequential(conv2d(cin, cout, kernel_size, dilation=dilation, ws=ws), norm(cout), act())


def double_conv(cin: int, cout: int, norm: Callable[[int], nn.Module], act: Callable[[], nn.Module],
                ws: bool = False) -> nn.Sequential:
    """Two :func:`conv_norm_act` 3x3 units, ``cin -> cout -> cout``: the U-Net block."""
    return nn.Sequential(conv_norm_act(cin, cout, norm, act, ws=ws), conv_norm_act(cout, cout, norm, act, ws=ws))


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling (half-pixel centres). Symmetric under flips and transposes of the grid, so it
    commutes exactly with the dihedral grid actions (used by the equivariant U-Net)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def standardize(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Functional form of :meth:`WSConv2d.standardized_weight` (used for per-sample pull-backs)."""
    var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), keepdim=True, unbiased=False)
    return (w - mean) * torch.rsqrt(var + eps)


class DataStandardize(nn.Module):
    """Per-channel standardisation with statistics of the whole training set (Tramèr & Boneh 2021's "data
    normalization"), frozen: ``(x - mean[c]) / sqrt(var[c] + eps)``, and 0 for a channel whose variance is 0.

    What it averages over: the mean and variance of channel ``c`` are over every training sample and every
    spatial position of that channel, computed **once, privately**, before DP-SGD starts
    (:func:`zoo.dp.data_norm.fit_private_statistics`, which ``zoo.train`` calls and records in the privacy ledger);
    at training and test time each sample is standardised alone with those fixed numbers, so the layer uses no
    batch statistics and has no trainable parameters (no per-sample gradient is needed). The statistics are
    buffers: they travel with the checkpoint. ``groups`` (one id per channel, ``0 .. G-1``; default one group)
    splits the channels into groups released separately, each with clips of its own scale (a ScatterNet's
    orders 0, 1 and 2 differ by orders of magnitude: under one clip the noise would swamp the small ones). Until
    fitted (``fitted`` 0: a model just created) the layer is the identity, so a model can be built, traced and
    tested before it sees data."""

    def __init__(self, num_channels: int, groups: list[int] | None = None, eps: float = 1e-5):
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        groups = [0] * num_channels if groups is None else [int(g) for g in groups]
        if len(groups) != num_channels or sorted(set(groups)) != list(range(max(groups) + 1)):
            raise ValueError(f"groups must give each of the {num_channels} channels a group id, the ids 0 .. G-1 "
                             "all used")
        self.num_groups = max(groups) + 1
        self.register_buffer("group", torch.tensor(groups), persistent=False)
        self.register_buffer("mean", torch.zeros(num_channels))
        self.register_buffer("var", torch.ones(num_channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Store fitted statistics (``[C]`` each; ``var`` >= 0) and mark the layer fitted."""
        if mean.shape != (self.num_channels,) or var.shape != (self.num_channels,):
            raise ValueError(f"expected statistics of shape ({self.num_channels},), got {tuple(mean.shape)} and "
                             f"{tuple(var.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()) or (var < 0).any():
            raise ValueError("the statistics must be finite and the variances >= 0")
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.fitted.fill_(1)

    def forward(self, x):
        if not self.fitted:
            return x
        view = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.where(self.var > 0, torch.rsqrt(self.var + self.eps), torch.zeros_like(self.var))
        return (x - self.mean.view(view)) * scale.view(view)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, fitted={bool(self.fitted)}"


class Scattering2D(nn.Module):
    """Fixed 2D wavelet scattering transform (Mallat 2012; Oyallon & Mallat 2015), order 2, as in kymatio.

    Each input channel is reflect-padded, then filtered in the Fourier domain with Morlet wavelets at
    ``J`` scales and ``L`` orientations (kymatio's filter bank, :func:`kymatio.scattering2d.filter_bank.filter_bank`),
    with a complex modulus after each wavelet and a Gaussian low-pass of width ``2**J`` at the end. A
    ``[B, C, H, W]`` input gives ``[B, C * n, H / 2**J, W / 2**J]`` with ``n = 1 + J*L + L**2 * J*(J-1)/2``
    coefficients per channel (81 for J=2, L=8), channel-major, in kymatio's order (order 0, order 1 by
    ``(j1, theta1)``, order 2 by ``(j1, theta1, j2, theta2)``); equal to ``kymatio``'s ``ScatteringTorch2D``
    output reshaped to ``[B, C * n, h, w]`` (tested), but all wavelets of a scale in one batched FFT (about 330
    images/s at 3x32x32 on 2 CPU cores; kymatio's loop over paths: 290).

    No parameters and no state: the filters depend only on ``(H, W, J, L)``, are built on first use for each
    input size, and are kept out of the ``state_dict``. Each sample is transformed alone, so the layer is
    DP-safe and needs no per-sample gradient. H and W must be multiples of ``2**J`` and at least ``2 * 2**J``.
    Inside :func:`memoized_fixed_layers` (the training loop, for un-augmented views) a sample seen before is not
    transformed again.
    """

    def __init__(self, J: int = 2, L: int = 8):
        super().__init__()
        if J < 1 or L < 1:
            raise ValueError(f"Scattering2D needs J >= 1 and L >= 1, got J={J}, L={L}")
        self.J, self.L = J, L
        self._filters: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _MEMO["max_bytes"] or functorch_wrapped(x):
            return self.transform(x)
        with torch.no_grad():
            out = self._memoized(x.detach())
        # the input is data: the layers after this one keep their graph (and opacus its hooks), x gets no gradient
        return _Detached.apply(x, out) if x.requires_grad else out

    def _memoized(self, x: torch.Tensor) -> torch.Tensor:
        store = _MEMO["store"].setdefault((self.J, self.L, tuple(x.shape[1:]), x.dtype, str(x.device)), {})
        keys = [hashlib.blake2b(r.tobytes(), digest_size=16).digest()
                for r in x.cpu().reshape(x.shape[0], -1).numpy()]
        miss = [i for i, key in enumerate(keys) if key not in store]
        fresh = dict(zip(miss, self.transform(x[miss]))) if miss else {}
        for i, out in fresh.items():
            size = out.numel() * out.element_size()
            if _MEMO["bytes"] + size <= _MEMO["max_bytes"] and keys[i] not in store:
                store[keys[i]] = out.clone()
                _MEMO["bytes"] += size
        return torch.stack([fresh[i] if i in fresh else store[key] for i, key in enumerate(keys)])

    @property
    def orders(self) -> list[int]:
        """The scattering order (0, 1 or 2) of each output channel of one input channel, in output order."""
        J, L = self.J, self.L
        return [0] + [1] * (J * L) + [2] * (L * L * J * (J - 1) // 2)

    @property
    def coefficients(self) -> int:
        """Output channels per input channel."""
        J, L = self.J, self.L
        return 1 + J * L + L * L * J * (J - 1) // 2

    def _bank(self, h: int, w: int, device, dtype) -> dict:
        key = (h, w, str(device), dtype)
        if key not in self._filters:
            from kymatio.scattering2d.filter_bank import filter_bank
            from kymatio.scattering2d.utils import compute_padding

            hp, wp = compute_padding(h, w, self.J)
            bank = filter_bank(hp, wp, self.J, self.L)
            t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731  real Fourier filters
            psi = [[p for p in bank["psi"] if p["j"] == j] for j in range(self.J)]  # by scale, theta order
            self._filters[key] = {
                "pad": ((wp - w) // 2, (wp - w + 1) // 2, (hp - h) // 2, (hp - h + 1) // 2),
                "phi": [t(level) for level in bank["phi"]["levels"]],
                # psi[j][res]: the L wavelets of scale j at resolution 2**-res, [L, hp/2**res, wp/2**res]
                "psi": [[t(np.stack([p["levels"][r] for p in psi[j]])) for r in range(len(psi[j][0]["levels"]))]
                        for j in range(self.J)],
            }
        return self._filters[key]

    @staticmethod
    def _subsample(x: torch.Tensor, k: int) -> torch.Tensor:
        """Fourier-domain periodisation: the spectrum of ``x`` subsampled by ``k`` in space."""
        if k == 1:
            return x
        h, w = x.shape[-2] // k, x.shape[-1] // k
        rows = sum(x[..., i * h:(i + 1) * h, :] for i in range(k))  # sums of slices: far faster than a strided mean
        return sum(rows[..., j * w:(j + 1) * w] for j in range(k)) / (k * k)

    def _lowpass(self, u: torch.Tensor, phi: torch.Tensor, k: int) -> torch.Tensor:
        return torch.fft.ifft2(self._subsample(u * phi, k)).real[..., 1:-1, 1:-1]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The scattering coefficients of ``x`` (``forward`` without the memo)."""
        if x.dim() != 4:
            raise ValueError(f"Scattering2D expects [B, C, H, W], got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        step = 2 ** self.J
        if h % step or w % step or min(h, w) < 2 * step:
            raise ValueError(f"Scattering2D(J={self.J}) needs H and W multiples of {step} and at least "
                             f"{2 * step}, got {h}x{w}; resize or pad the input")
        f = self._bank(h, w, x.device, x.dtype)
        rows = x.reshape(b * c, h, w)
        # a few images at a time: the order-2 products are L*L times the image, and cache-sized pieces run
        # about 3x faster on a CPU than the whole batch at once
        s = torch.cat([self._rows(rows[i:i + self.CHUNK], f) for i in range(0, b * c, self.CHUNK)]) if b * c \
            else rows.new_zeros(0, self.coefficients, h // step, w // step)
        return s.reshape(b, c * s.shape[1], *s.shape[-2:])

    CHUNK = 24  # image channels per piece (measured on 2 CPU cores: 8 RGB images)

    def _rows(self, x: torch.Tensor, f: dict) -> torch.Tensor:
        """The coefficients ``[N, n, h, w]`` of ``N`` single-channel images ``[N, H, W]``."""
        step = 2 ** self.J
        u0 = torch.fft.fft2(F.pad(x[:, None], f["pad"], mode="reflect")[:, 0])
        out = [self._lowpass(u0, f["phi"][0], step)[:, None]]
        second = []
        for j1 in range(self.J):
            u1 = self._subsample(u0[:, None] * f["psi"][j1][0], 2 ** j1)  # [N, L, ...] at resolution 2**-j1
            u1 = torch.fft.fft2(torch.fft.ifft2(u1).abs())
            out.append(self._lowpass(u1, f["phi"][j1], 2 ** (self.J - j1)))
            if j1 + 1 < self.J:  # order 2: for each theta1, every (j2 > j1, theta2) in kymatio's order
                blocks = []
                for j2 in range(j1 + 1, self.J):
                    u2 = self._subsample(u1[:, :, None] * f["psi"][j2][j1], 2 ** (j2 - j1))
                    u2 = torch.fft.fft2(torch.fft.ifft2(u2).abs())
                    blocks.append(self._lowpass(u2, f["phi"][j2], 2 ** (self.J - j2)))  # [N, L, L, h', w']
                second.append(torch.cat(blocks, dim=2).flatten(1, 2))
        return torch.cat(out + second, dim=1)


class _Detached(torch.autograd.Function):
    """``out``, computed without autograd, placed in the graph of ``x``: the layers after it are differentiated as
    usual and their backward hooks fire, and ``x`` gets no gradient (``None``)."""

    @staticmethod
    def forward(ctx, x, out):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return None, None


MEMO_BYTES = 4 * 2 ** 30  # the training loop's memo budget (zoo.training.engine): CIFAR-10's scattering takes 3.1 GB
_MEMO: dict = {"max_bytes": 0, "bytes": 0, "store": {}}  # the per-sample memo of fixed layers


@contextlib.contextmanager
def memoized_fixed_layers(max_bytes: int) -> Iterator[None]:
    """Within the block, every :class:`Scattering2D` remembers its output per input sample (keyed by the layer's
    ``(J, L)``, the sample's shape, dtype and device and a hash of its bytes), up to ``max_bytes`` of outputs in
    all, and returns the remembered output when the same sample comes again, in this model or in any other
    (several runs in one process share it). The outputs are those of the layer itself (it is deterministic, has
    no parameters and sees one sample at a time), so training is unchanged: only the repeated cost goes, which is
    most of a ScatterNet's step when the training images are not augmented. Inside the block the layer's input
    gets no gradient (it is data; nothing after the layer changes). ``max_bytes`` 0 turns the memo off inside
    the block. Blocks nest (an inner block does not lower the budget); the memo is dropped when the outermost
    block that turned it on ends."""
    before = dict(_MEMO)
    _MEMO["max_bytes"] = max(0, int(max_bytes)) and max(int(max_bytes), before["max_bytes"])
    try:
        yield
    finally:
        _MEMO["max_bytes"] = before["max_bytes"]
        if not before["max_bytes"]:
            _MEMO["store"], _MEMO["bytes"] = {}, 0


# ----------------------------------------------------------------------------- grad samplers of these layers
def empty_grad_sample(layer: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of an empty (Poisson) batch: ``[0, *p.shape]`` for each trainable parameter."""
    return {p: p.new_zeros((0, *p.shape)) for p in layer.parameters(recurse=False) if p.requires_grad}


def _grouped_conv_pays(x: torch.Tensor, backprops: torch.Tensor, layer: nn.Module) -> bool:
    """Whether :func:`conv_filter_grad_sample` computes the filter gradient as one grouped convolution (the batch as
    groups) instead of opacus' unfold + batched matmul. A fixed rule, not a per-run timing, so that a seeded run is
    the same computation every time: on the CPU (oneDNN) the grouped convolution was 3-6x faster for layers with
    outputs of at least 16x16 and at least 8 input channels, and no faster (or slower, at 128 channels and 8x8)
    elsewhere (``python eval/bench_train_loop.py`` times both in the training loop). GPUs keep opacus' route
    until they are measured. Both are exact; they differ by float rounding only."""
    return (x.device.type == "cpu" and getattr(layer, "groups", 1) == 1 and tuple(layer.dilation) == (1, 1)
            and isinstance(layer.padding, tuple) and backprops.shape[-1] * backprops.shape[-2] >= 256
            and x.shape[1] >= 8)


def conv_filter_grad_sample(layer: nn.Module, x: torch.Tensor, backprops: torch.Tensor,
                            out_channels: int | None = None) -> torch.Tensor:
    """Per-sample gradient ``[B, C_out, C_in/groups, kH, kW]`` of the filter a conv layer applied to ``x``.

    For any layer with ``kernel_size``, ``stride``, ``padding``, ``dilation`` (and ``groups``) attributes whose
    forward is a conv2d with a computed filter. Either the unfold trick opacus uses for ``nn.Conv2d``, or, where
    it is faster (:func:`_grouped_conv_pays`), the weight gradient of one convolution whose groups are the
    samples: sample i's input ``[1, C_in, H, W]`` block convolved with its backprops is exactly its own gradient.
    """
    n, g = x.shape[0], getattr(layer, "groups", 1)
    cout = out_channels or layer.out_channels
    if _grouped_conv_pays(x, backprops, layer):
        kh, kw = layer.kernel_size
        _, gw, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * cout, *backprops.shape[2:]), x.reshape(1, n * x.shape[1], *x.shape[2:]),
            x.new_empty(n * cout, x.shape[1], kh, kw), None, list(layer.stride), list(layer.padding), [1, 1], False, [0, 0],
            n, [False, True, False])
        return gw.view(n, cout, x.shape[1], kh, kw)
    cols = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                    dilation=layer.dilation)  # opacus' strided unfold: several times faster than F.unfold on CPU
    cols = cols.view(n, g, -1, cols.shape[-1])                     # [n, g, Cin/g*kh*kw, L]
    bp = backprops.reshape(n, g, -1, cols.shape[-1])                # [n, g, Cout/g, L]
    return torch.einsum("ngol,ngpl->ngop", bp, cols).reshape(n, cout, x.shape[1] // g, *layer.kernel_size)


@register_grad_sampler(WSConv2d)
def ws_conv2d_grad_sample(layer: WSConv2d, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Per-sample gradient of a weight-standardized conv.

    First the per-sample gradient ``gh_i`` w.r.t. the standardized filter ``wh = (w - mean) / s``
    (:func:`conv_filter_grad_sample`), then the exact pull-back through the standardization, per output channel
    over its ``n = C_in/groups * kH * kW`` entries: ``g_i = (gh_i - mean(gh_i) - wh * mean(gh_i * wh)) / s``.
    """
    x = activations[0].to(backprops.dtype)
    n, w = x.shape[0], layer.weight
    if n == 0:
        return empty_grad_sample(layer)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if w.requires_grad:
        gh = conv_filter_grad_sample(layer, x, backprops)
        with torch.no_grad():
            var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
            s = torch.sqrt(var + layer.eps)
            wh = (w - mean) / s
        # in place on gh: it is the only [B, *w.shape] buffer this sampler allocates
        fan = wh[0].numel()
        proj = torch.einsum("noikl,oikl->no", gh, wh).div_(fan).view(n, -1, 1, 1, 1)  # mean(gh * wh)
        gh.sub_(gh.mean((2, 3, 4), keepdim=True)).addcmul_(wh.unsqueeze(0), proj, value=-1.0).div_(s)
        ret[w] = gh
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum((2, 3))
    return ret
