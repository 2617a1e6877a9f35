"""Private data normalisation (Tramèr & Boneh 2021, arXiv:2011.11660): the statistics of every
:class:`zoo.nn.layers.DataStandardize` layer of a model, fitted on the training set with the Gaussian mechanism
before DP-SGD starts, and recorded in the privacy ledger.

The mechanism, for one layer whose input has C channels in G groups (``DataStandardize.groups``), over the N
training samples (as prepared for the model, not augmented):

1. each sample's input to the layer ``x_i`` gives two C-vectors: its per-channel mean over the positions ``m_i``
   and its per-channel mean of squares ``s_i``;
2. the part of each in group g is clipped in L2 norm: ``m_i[g] * min(1, c_mean[g] / |m_i[g]|)`` and
   ``s_i[g] * min(1, c_square[g] / |s_i[g]|)``;
3. each of the 2 G sums over the N samples gets Gaussian noise ``N(0, (sigma c)^2 I)`` with its own clip c and is
   divided by N: ``mean = M``, ``var = max(S - M^2, 0)``.

Tramèr & Boneh release one group (``G = 1``) with clips at the median of the private norms. zoo clips each group
at its own scale, because one clip sized for a ScatterNet's order-0 channels buries its order-2 channels, whose
variances (about 3e-5 on CIFAR-10) are below the noise (about 2e-4) such a clip brings.

**Guarantee, and what it assumes.** Under add/remove-one neighbouring (opacus', and the ledger's), one sample
changes each clipped sum by at most its clip in L2, so each noisy sum is the Gaussian mechanism with noise
multiplier ``sigma``: Rényi DP ``alpha / (2 sigma^2)`` at every order alpha, which is opacus' subsampled-Gaussian
RDP at sample rate 1 for one step. The 2 G releases of each layer compose with each other and with DP-SGD: the
ledger records them as ``[sigma, 1.0, 2 G]`` (:attr:`zoo.privacy.Ledger.statistics`), and DP-SGD's noise
multiplier is calibrated for what is left of the target epsilon. It assumes that

- N is public: the divisor is read as a constant fixed in advance (it is in the ledger, and DP-SGD's expected
  batch ``q N`` uses it the same way, as opacus does), not as a count of the private data;
- the clips are chosen without the training data (the recipe's ``norm_clip``: ``[c_mean, c_square]`` of group 0,
  then of group 1, ...; Tramèr & Boneh's code takes the median of the private norms, a leak it comments on);
- what the model computes before the layer is a function of the one sample (no batch statistics anywhere in zoo)
  and of weights fixed before the mechanism runs (a ScatterNet's front end has none);
- the noise is drawn from the run's seeded generator, which is secret for a release.

The layers are fitted one at a time in module order, each on inputs computed with the layers before it already
fitted; each costs ``[sigma, 1.0, 2 G]``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from zoo.nn.layers import DataStandardize

__all__ = ["statistics_layers", "needs_fitting", "releases", "statistics_history", "fit_private_statistics"]

WHAT = "per-channel mean and mean of squares of the layer's input, over all training samples and positions"


def statistics_layers(model: nn.Module) -> list[tuple[str, DataStandardize]]:
    """The model's :class:`DataStandardize` layers, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DataStandardize)]


def needs_fitting(model: nn.Module) -> bool:
    """Whether some :class:`DataStandardize` layer of ``model`` has no statistics yet."""
    return any(not bool(m.fitted) for _, m in statistics_layers(model))


def releases(model: nn.Module) -> int:
    """How many Gaussian releases fitting ``model``'s :class:`DataStandardize` layers makes: two per group."""
    return sum(2 * m.num_groups for _, m in statistics_layers(model))


def statistics_history(sigma: float, count: int) -> list[list]:
    """What ``count`` releases at noise multiplier ``sigma`` (:func:`releases`) add to the accountant's history
    (opacus' ``[(sigma, q, steps)]`` format): Gaussian mechanisms at sample rate 1."""
    return [[float(sigma), 1.0, int(count)]] if count else []


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the layer's input is in hand."""


def _check_settings(sigma: float, clip, groups: int) -> list[tuple[float, float]]:
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool)) or not 0 <= sigma < math.inf:
        raise ValueError(f"norm_sigma must be a finite number >= 0 (0: exact statistics, no privacy), got {sigma!r}")
    if not isinstance(clip, (list, tuple)) or len(clip) != 2 * groups or \
            not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c < math.inf for c in clip):
        raise ValueError(f"norm_clip must be {2 * groups} finite numbers > 0: the L2 clips [c_mean, c_square] of each "
                         f"sample's per-channel mean and mean of squares, for each of the layer's {groups} channel "
                         f"group(s) in turn; got {clip!r}")
    return [(float(clip[2 * g]), float(clip[2 * g + 1])) for g in range(groups)]


def _clipped_sum(v: torch.Tensor, clip: float) -> torch.Tensor:
    """Sum over samples of the rows of ``v`` [B, C], each scaled to L2 norm at most ``clip`` (float64)."""
    v = v.double()
    norms = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    return (v * (clip / norms.clamp_min(1e-300)).clamp(max=1.0)).sum(0)


@torch.no_grad()
def fit_private_statistics(model: nn.Module, train, *, sigma: float, clip, generator: torch.Generator,
                           device: torch.device | str = "cpu", batch_size: int = 500,
                           progress: bool = False) -> list[dict]:
    """Fit every unfitted :class:`DataStandardize` layer of ``model`` on the data set ``train`` (a zoo split:
    ``len`` and ``batch(indices) -> (x, y)``) with the mechanism of the module docstring, in place. ``clip``:
    ``[c_mean, c_square]`` per channel group, flat (every layer of the model has the same number of groups).
    Returns one ledger entry per layer (:attr:`zoo.privacy.Ledger.statistics`): the layer, what was released,
    ``sigma``, sample rate 1, the number of releases (two per group), the clips and N. ``sigma`` 0 computes
    exact statistics (no guarantee: for the noise-free reference run only). ``progress``: a bar per layer."""
    device = torch.device(device)
    n = len(train)
    if n == 0:
        raise ValueError("no training samples to fit the normalisation statistics on")
    entries = []
    was_training = model.training
    model.eval()
    try:
        for name, layer in statistics_layers(model):
            if bool(layer.fitted):
                continue
            seen: list[torch.Tensor] = []

            def capture(_module, args):
                seen.append(args[0])
                raise _Captured

            clips = _check_settings(sigma, clip, layer.num_groups)
            members = [(layer.group == g).nonzero().flatten().to(device) for g in range(layer.num_groups)]
            handle = layer.register_forward_pre_hook(capture)
            c = layer.num_channels
            sums = torch.zeros(c, dtype=torch.float64, device=device), torch.zeros(c, dtype=torch.float64,
                                                                                    device=device)
            try:
                for start in tqdm(range(0, n, batch_size), desc=f"statistics of {name}", disable=not progress,
                                  unit="batch", dynamic_ncols=True):
                    x, _ = train.batch(torch.arange(start, min(start + batch_size, n)))
                    try:
                        model(x.to(device))
                    except _Captured:
                        pass
                    else:
                        raise RuntimeError(f"{name} was not reached by the model's forward pass; it cannot be fitted")
                    h = seen.pop()
                    if not torch.isfinite(h).all():
                        raise ValueError(f"the input of {name} is not finite for some training sample in "
                                         f"[{start}, {start + batch_size}); check the data")
                    flat = h.flatten(2) if h.dim() > 2 else h.unsqueeze(-1)
                    mean_i, square_i = flat.mean(-1), flat.pow(2).mean(-1)
                    for idx, (c_mean, c_square) in zip(members, clips):
                        sums[0][idx] += _clipped_sum(mean_i[:, idx], c_mean)
                        sums[1][idx] += _clipped_sum(square_i[:, idx], c_square)
            finally:
                handle.remove()
            for idx, group_clips in zip(members, clips):  # one Gaussian release per group and statistic
                for total, clip_ in zip(sums, group_clips):
                    total[idx] += sigma * clip_ * torch.randn(len(idx), generator=generator, device=generator.device,
                                                              dtype=torch.float64).to(device)
            mean, square = sums[0] / n, sums[1] / n
            var = (square - mean ** 2).clamp_min(0.0)
            layer.set_statistics(mean.to(layer.mean.dtype), var.to(layer.var.dtype))
            entries.append({"layer": name, "mechanism": "gaussian", "what": WHAT, "sigma": float(sigma),
                            "sample_rate": 1.0, "releases": 2 * layer.num_groups,
                            "clip": [c for pair in clips for c in pair], "num_samples": n})
    finally:
        model.train(was_training)
    return entries
