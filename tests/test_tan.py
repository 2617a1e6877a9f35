"""TAN scaling laws (Sander et al. 2023): closed form against the accountant, and the proposal rule."""
from __future__ import annotations

import math

import pytest
import torch

from zoo.privacy import compute_epsilon, tan

CLOSED_FORM_TOLERANCE = 0.10  # relative, for sigma >= 2.5 (the closed form overestimates: it is conservative)


def test_eta_and_its_inverse():
    assert tan.eta(0.1, 200, 2.0) == pytest.approx(0.1 * 10 / 2.0)
    for eps in (0.5, 1.0, 3.0, 8.0):
        e = tan.eta_for_epsilon(eps, 1e-5)
        assert e * e + 2 * e * math.sqrt(math.log(1e5)) == pytest.approx(eps)


def test_closed_form_agrees_with_the_accountant_at_tans_cifar_reference():
    q = 4096 / 50_000
    acc = compute_epsilon([(3.0, q, 2500)], 1e-5)
    assert abs(tan.closed_form_epsilon(q, 2500, 3.0, 1e-5) - acc) / acc < CLOSED_FORM_TOLERANCE


@pytest.mark.parametrize("n, eps", [(50_000, 8.0), (50_000, 3.0), (4_708, 8.0)])  # CIFAR-10, PneumoniaMNIST
def test_proposal_meets_the_target_with_the_accountant(n, eps):
    p = tan.propose(eps, 1e-5, n)
    assert 1 <= p["batch_size"] < n and p["steps"] == tan.TAN_STEPS and p["sigma"] >= 2.0
    assert eps - 0.05 <= p["epsilon"] <= eps  # the accountant, not the closed form, sets sigma
    assert p["epsilon"] == pytest.approx(compute_epsilon([(p["sigma"], p["batch_size"] / n, p["steps"])], 1e-5))
    assert abs(p["closed_form_epsilon"] - p["epsilon"]) / p["epsilon"] < CLOSED_FORM_TOLERANCE


def test_proposal_recovers_tans_cifar_recipe():
    """From (8, 1e-5) and N = 50,000 alone: about TAN's B = 4096, sigma = 3, S = 2500."""
    p = tan.propose(8.0, 1e-5, 50_000)
    assert 3500 <= p["batch_size"] <= 5000 and 2.5 <= p["sigma"] <= 3.5


def test_scaled_down_simulation_keeps_steps_and_noise_per_sample_but_is_not_private_at_the_target():
    full = tan.propose(8.0, 1e-5, 50_000)
    small = tan.scale_down(full["batch_size"], full["sigma"], full["steps"], 256)
    assert small["steps"] == full["steps"]
    assert small["sigma"] / small["batch_size"] == pytest.approx(full["sigma"] / full["batch_size"])
    eps_small = compute_epsilon([(small["sigma"], 256 / 50_000, small["steps"])], 1e-5)
    assert eps_small > 5 * full["epsilon"]
    with pytest.raises(ValueError):
        tan.scale_down(256, 1.0, 10, 512)


def test_proposal_refuses_a_delta_at_or_above_one_over_n():
    with pytest.raises(ValueError, match="1/N"):
        tan.propose(8.0, 1e-3, 5_000)


@pytest.mark.parametrize("epsilon,delta,n,steps", [(8.0, 1e-5, 50_000, 2500), (3.0, 1e-5, 50_000, 360),
                                                   (1.0, 1e-4, 4_708, 200), (8.0, 1e-4, 222, 300)])
def test_noise_to_signal_depends_on_the_budget_and_d_not_on_the_batch_or_steps(epsilon, delta, n, steps):
    """TAN's closed form makes the run's noise-to-signal ratio sqrt(d) / (sqrt(2) eta N): the exact ratio of
    accountant-calibrated recipes at different batch sizes lies between 0.75 and 1 times it where sigma >= 2 (the
    closed form's range; it is conservative), and it grows as sqrt(d)."""
    from zoo.dp.accounting import calibrate_sigma

    d = 100_000
    bound = tan.noise_to_signal_for(epsilon, delta, n, d)
    assert tan.noise_to_signal_for(epsilon, delta, n, 4 * d) == pytest.approx(2 * bound)
    for batch in (n // 16, n // 4):
        sigma = calibrate_sigma(epsilon, delta, batch / n, steps, "rdp")
        if sigma < 2:
            continue
        assert 0.75 * bound <= tan.noise_to_signal(d, sigma, batch, steps) <= 1.001 * bound, (batch, sigma)


def test_noise_to_signal_is_the_ratio_of_the_summed_noise_to_the_largest_summed_signal():
    """Simulated: S steps of a mean clipped gradient of norm C (all aligned, the best case) against S draws of
    N(0, (sigma C / B)^2 I_d); the norm ratio of the sums is noise_to_signal."""
    g = torch.Generator().manual_seed(0)
    d, sigma, batch, steps, clip = 20_000, 3.0, 64, 50, 0.7
    direction = torch.randn(d, generator=g)
    signal = steps * clip * direction / direction.norm()
    noise = sum(torch.randn(d, generator=g) * sigma * clip / batch for _ in range(steps))
    ratio = float(noise.norm() / signal.norm())
    assert ratio == pytest.approx(tan.noise_to_signal(d, sigma, batch, steps), rel=0.03)
    with pytest.raises(ValueError):
        tan.noise_to_signal(0, sigma, batch, steps)
