"""TAN scaling laws (Sander et al. 2023): closed form against the accountant, and the proposal rule."""
from __future__ import annotations

import math

import pytest

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
