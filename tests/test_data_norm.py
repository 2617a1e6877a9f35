"""Private data normalisation (zoo.dp.data_norm, zoo.nn.layers.DataStandardize): the layer's contract, the mechanism's
sensitivity and noise scale (the privacy claim), and its place in the ledger of a real run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import zoo
from zoo.dp.data_norm import fit_private_statistics, needs_fitting, releases, statistics_history
from zoo.nn.layers import DataStandardize
from zoo.privacy import BudgetExhaustedError, Ledger, calibrate_sigma, compute_epsilon
from zoo.catalog.registry import get_card, load_checkpoint

QUIET = dict(progress=False)


class _Split:
    """A zoo split's interface (``len``, ``batch``) over a tensor."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        return self.x[idx], torch.zeros(len(idx), dtype=torch.long)


def _net(c=4):
    return nn.Sequential(DataStandardize(c), nn.Flatten(), nn.Linear(c * 9, 2))


def _fit(x, sigma=0.0, clip=(1e6, 1e6), seed=0, net=None):
    net = net or _net(x.shape[1])
    entries = fit_private_statistics(net, _Split(x), sigma=sigma, clip=list(clip),
                                     generator=torch.Generator().manual_seed(seed), batch_size=7)
    return net[0], entries


def test_unfitted_layer_is_the_identity_and_a_fitted_one_standardises_each_channel():
    x = torch.randn(5, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + 1.5
    layer = DataStandardize(3)
    assert torch.equal(layer(x), x) and needs_fitting(nn.Sequential(layer))
    layer.set_statistics(torch.tensor([1.5, 1.5, 0.0]), torch.tensor([1.0, 4.0, 0.0]))
    y = layer(x)
    assert torch.allclose(y[:, 0], (x[:, 0] - 1.5) / math.sqrt(1 + 1e-5))
    assert torch.allclose(y[:, 1], (x[:, 1] - 1.5) / math.sqrt(4 + 1e-5))
    assert torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))  # a channel of variance 0 carries nothing
    assert not needs_fitting(nn.Sequential(layer))
    assert {"mean", "var", "fitted"} <= set(layer.state_dict())  # the statistics travel with the checkpoint
    with pytest.raises(ValueError, match="finite"):
        layer.set_statistics(torch.tensor([0.0, math.nan, 0.0]), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        layer.set_statistics(torch.zeros(2), torch.ones(2))


def test_exact_statistics_are_the_channel_mean_and_variance_over_samples_and_positions():
    x = torch.randn(30, 4, 3, 3, dtype=torch.float64) * 2 + torch.arange(4.0).view(1, 4, 1, 1)
    layer, entries = _fit(x.float())
    want_mean = x.mean(dim=(0, 2, 3))
    want_var = (x ** 2).mean(dim=(0, 2, 3)) - want_mean ** 2
    assert torch.allclose(layer.mean.double(), want_mean, atol=1e-5)
    assert torch.allclose(layer.var.double(), want_var, atol=1e-4)
    assert entries == [{"layer": "0", "mechanism": "gaussian", "what": entries[0]["what"], "sigma": 0.0,
                        "sample_rate": 1.0, "releases": 2, "clip": [1e6, 1e6], "num_samples": 30}]
    again, more = _fit(x.float(), net=nn.Sequential(layer))  # a fitted layer is not fitted (or charged) twice
    assert more == [] and torch.equal(again.mean, layer.mean)


def test_adding_one_sample_moves_each_released_sum_by_at_most_its_clip():
    """The sensitivity the Gaussian mechanism's guarantee rests on (add/remove-one neighbours): whatever the added
    sample, the noise-free sums of the clipped per-sample means and means of squares move by at most the clips."""
    clip = (0.5, 0.25)
    x = torch.randn(20, 4, 3, 3)
    for outlier in (torch.full((1, 4, 3, 3), 1e4), torch.randn(1, 4, 3, 3) * 0.01, -torch.full((1, 4, 3, 3), 50.)):
        a, _ = _fit(x, clip=clip)
        b, _ = _fit(torch.cat([x, outlier]), clip=clip)
        sums = lambda layer, n: (layer.mean.double() * n, (layer.var.double() + layer.mean.double() ** 2) * n)  # noqa
        (ma, sa), (mb, sb) = sums(a, 20), sums(b, 21)
        assert torch.linalg.vector_norm(mb - ma) <= clip[0] * (1 + 1e-5)
        assert torch.linalg.vector_norm(sb - sa) <= clip[1] * (1 + 1e-4)
    big, _ = _fit(torch.cat([x, torch.full((1, 4, 3, 3), 1e4)]), clip=clip)
    assert torch.linalg.vector_norm(big.mean.double() * 21 - a.mean.double() * 20) == pytest.approx(clip[0], rel=1e-4)


def test_each_channel_group_is_clipped_at_its_own_scale():
    """Two groups a thousand times apart in scale: each sum moves by at most its own group's clip when a sample
    is added, and the small group's statistics are not buried under noise sized for the large one."""
    scale = torch.tensor([1.0, 1.0, 1e-3, 1e-3]).view(1, 4, 1, 1)
    x = (torch.randn(200, 4, 3, 3) + 2) * scale
    net = lambda: nn.Sequential(DataStandardize(4, groups=[0, 0, 1, 1]), nn.Flatten(), nn.Linear(36, 2))  # noqa
    clip = (3.0, 9.0, 3e-3, 9e-6)
    a, entries = _fit(x, clip=clip, net=net())
    assert entries[0]["releases"] == 4 and entries[0]["clip"] == list(clip)
    b, _ = _fit(torch.cat([x, torch.full((1, 4, 3, 3), 1e3)]), clip=clip, net=net())
    moved = b.mean.double() * 201 - a.mean.double() * 200
    assert torch.linalg.vector_norm(moved[:2]) <= 3.0 * (1 + 1e-5)
    assert torch.linalg.vector_norm(moved[2:]) <= 3e-3 * (1 + 1e-5)
    err = lambda layer: ((layer.var[2:] - a.var[2:]).abs() / a.var[2:]).max()  # noqa: E731
    assert err(_fit(x, sigma=1.0, clip=clip, net=net())[0]) < 0.3  # small channels: noise of their own scale
    assert err(_fit(x, sigma=1.0, clip=clip[:2])[0]) > 10  # under the large group's clip they drown
    with pytest.raises(ValueError, match="4 finite numbers"):
        _fit(x, clip=(1.0, 1.0), net=net())
    with pytest.raises(ValueError, match="group id"):
        DataStandardize(4, groups=[0, 2, 2, 2])


def test_every_release_carries_its_own_noise_of_scale_sigma_times_its_clip():
    """Each of the 2 G released sums (mean and mean of squares, per group) carries N(0, (sigma c)^2) per
    coordinate, drawn independently: measured over many seeded draws. A shared draw between two releases would
    let their difference cancel the noise."""
    # N far above sigma and clips above every sample's norms: no variance is clamped at 0, so var + mean^2 gives
    # back the noisy sum of squares
    x = torch.randn(1000, 4, 3, 3)
    net = lambda: nn.Sequential(DataStandardize(4, groups=[0, 0, 1, 1]), nn.Flatten(), nn.Linear(36, 2))  # noqa
    clip = (2.0, 7.0, 5.0, 9.0)
    exact, _ = _fit(x, clip=clip, net=net())
    sums = lambda layer: (layer.mean.double() * 1000, (layer.var.double() + layer.mean.double() ** 2) * 1000)  # noqa
    m0, s0 = sums(exact)
    noise_m, noise_s = [], []
    for seed in range(400):
        m, sq = sums(_fit(x, sigma=8.0, clip=clip, seed=seed, net=net())[0])
        noise_m.append(m - m0)
        noise_s.append(sq - s0)
    noise_m, noise_s = torch.stack(noise_m), torch.stack(noise_s)
    for noise, scales in ((noise_m, (2.0, 5.0)), (noise_s, (7.0, 9.0))):
        for g, c in enumerate(scales):
            part = noise[:, 2 * g:2 * g + 2]
            assert part.mean().abs() < 4 * 8.0 * c / math.sqrt(part.numel())
            assert part.std().item() == pytest.approx(8.0 * c, rel=0.08)
    # independent draws: the correlation between any two released coordinates is about 0
    corr = torch.corrcoef(torch.cat([noise_m, noise_s], 1).T.float())
    assert (corr - torch.eye(8)).abs().max() < 0.2


def test_bad_settings_are_refused():
    x = torch.randn(5, 4, 3, 3)
    for sigma, clip, match in ((-1.0, (1, 1), "norm_sigma"), (math.inf, (1, 1), "norm_sigma"),
                               (1.0, (1,), "norm_clip"), (1.0, (0, 1), "norm_clip"), (1.0, (1, math.inf), "norm_clip"),
                               (1.0, (1, 1, 1, 1), "norm_clip")):
        with pytest.raises(ValueError, match=match):
            _fit(x, sigma=sigma, clip=clip)
    with pytest.raises(ValueError, match="not finite"):
        _fit(torch.full((5, 4, 3, 3), math.nan))


def test_the_ledger_composes_the_release_with_the_steps_and_refuses_an_edited_one():
    stats = [{"layer": "norm", "mechanism": "gaussian", "what": "", "sigma": 8.0, "sample_rate": 1.0, "releases": 2,
              "clip": [1.0, 1.0], "num_samples": 50_000}]
    led = Ledger(dataset="cifar10", num_samples=50_000, delta=1e-5, accountant="rdp", clip_norm=0.1,
                 target_epsilon=8.0, statistics=stats)
    assert led.accounted == statistics_history(8.0, 2) == [[8.0, 1.0, 2]]
    sigma = calibrate_sigma(8.0, 1e-5, 0.08192, 360, "rdp", history=led.accounted)
    assert sigma > calibrate_sigma(8.0, 1e-5, 0.08192, 360, "rdp")  # the release costs budget: more noise after
    led.record(sigma, 0.08192, 360)
    assert led.steps == 360  # the release is not a DP-SGD step
    assert led.epsilon() == pytest.approx(compute_epsilon([[8.0, 1.0, 2], [sigma, 0.08192, 360]], 1e-5))
    assert compute_epsilon(led.history, 1e-5) < led.epsilon() <= 8.0
    d = json.loads(json.dumps(led.to_dict()))
    assert Ledger.from_dict(d).epsilon() == led.epsilon()
    d["statistics"][0]["sigma"] = 80.0  # a cheaper release than was made
    with pytest.raises(ValueError, match="edited"):
        Ledger.from_dict(d)


@pytest.mark.parametrize("sigma,count", [(8.0, 2), (8.0, 6), (3.0, 1)])
def test_both_accountants_give_the_gaussian_mechanism_its_exact_epsilon(sigma, count):
    """A release at sample rate 1 is the plain Gaussian mechanism: ``count`` of them at noise multiplier sigma are
    one of sensitivity 1 at sigma / sqrt(count), whose exact epsilon at delta is that of Balle & Wang (2018).
    The PRV accountant matches it; RDP (a conversion) is an upper bound."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    s = sigma / math.sqrt(count)
    delta_of = lambda e: norm.cdf(-e * s + 1 / (2 * s)) - math.exp(e) * norm.cdf(-e * s - 1 / (2 * s))  # noqa: E731
    exact = brentq(lambda e: delta_of(e) - 1e-5, 1e-6, 50)
    hist = statistics_history(sigma, count)
    assert compute_epsilon(hist, 1e-5, "prv") == pytest.approx(exact, rel=0.02)
    assert exact <= compute_epsilon(hist, 1e-5, "rdp") <= 1.5 * exact


def test_training_fits_the_statistics_privately_and_records_them(data_dir, tmp_path):
    kw = dict(data_dir=data_dir, seed=0, train_subset=300, batch_size=60, physical_batch_size=64, steps=2,
              epsilon=8.0, test_subset=100, **QUIET)
    r = zoo.train("scatternet-cnn-datanorm", out_dir=tmp_path / "a", **kw)
    led = r["ledger"]
    card = get_card("scatternet-cnn-datanorm")["recipe"]
    assert releases(zoo.create_model("scatternet-cnn-datanorm")) == 6  # mean and square of 3 scattering orders
    assert led["statistics"][0]["sigma"] == card["norm_sigma"] and led["statistics"][0]["releases"] == 6
    assert led["statistics"][0]["clip"] == card["norm_clip"]
    assert led["statistics"][0]["num_samples"] == 300 and led["steps"] == 2
    assert led["epsilon"] == pytest.approx(compute_epsilon([[card["norm_sigma"], 1.0, 6], *led["history"]], 1e-5))
    assert led["epsilon"] <= 8.0
    model = r["model_object"]  # the EMA copy carries the fitted statistics
    assert not needs_fitting(model) and model.norm.var.gt(0).any()
    loaded, _ = load_checkpoint(tmp_path / "a" / "final.safetensors")
    for k in ("norm.mean", "norm.var", "norm.fitted"):
        assert torch.equal(loaded.state_dict()[k].float(), model.state_dict()[k].float()), k
    other = zoo.train("scatternet-cnn-datanorm", **{**kw, "seed": 1, "steps": 1})  # another secret noise draw
    diff = (other["model_object"].norm.mean - model.norm.mean).abs()
    assert diff.max() > 0 and diff.max() < 6 * math.sqrt(2) * 8.0 * max(card["norm_clip"]) / 300
    with pytest.raises(ValueError, match="norm_sigma"):
        zoo.train("scatternet-cnn-datanorm", norm_sigma=None, **kw)
    with pytest.raises(BudgetExhaustedError, match="before any DP-SGD step"):  # about epsilon 1.26 alone
        zoo.train("scatternet-cnn-datanorm", **{**kw, "epsilon": 1.0})
    with pytest.raises(ValueError, match="DataStandardize"):
        zoo.train("scatternet-cnn", norm_sigma=8.0, norm_clip=[1.0, 1.0], **kw)


def test_a_resumed_run_does_not_release_the_statistics_again(data_dir, tmp_path):
    from test_train import _interrupted_run_resumes_exactly

    kw = dict(data_dir=data_dir, seed=1, train_subset=300, batch_size=60, physical_batch_size=64, steps=4,
              checkpoint_every=2, test_subset=100, **QUIET)
    a, b, _ = _interrupted_run_resumes_exactly("scatternet-cnn-datanorm", tmp_path, **kw)
    assert b["ledger"]["statistics"] == a["ledger"]["statistics"] and len(b["ledger"]["statistics"]) == 1
    assert b["ledger"]["epsilon"] == a["ledger"]["epsilon"]
