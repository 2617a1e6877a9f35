"""zoo's epsilon against an independent accountant: Google's dp-accounting (RDP and PLD).

Both libraries account DP-SGD as a Poisson-subsampled Gaussian mechanism under add/remove-one neighbours, so a
history ``[(sigma, q, steps), ...]`` is the dp-accounting event ``SelfComposed(PoissonSampled(q, Gaussian(sigma)),
steps)`` per segment, composed. What is checked, and with which tolerance (figures measured over the grid below
and the larger grid of eval/crosscheck_accountants.py):

* RDP -> (epsilon, delta) conversion: opacus' ``get_privacy_spent`` (Balle et al. 2020, Thm 21) and dp-accounting's
  ``rdp.compute_epsilon`` (Asoodeh et al. 2020 / Canonne et al. 2020, Prop. 12) are the same formula,
  ``eps = rdp + log1p(-1/a) - log(delta*a)/(a-1)`` minimised over the orders: on the same RDP vector they agree to
  1e-12 relative (dp-accounting also skips orders <= 1.01, none of opacus', and floors epsilon at 0).
* RDP curve at integer orders (2..10, 12..63 and zoo's added 64..1024, ``zoo.privacy.RDP_ORDERS``): both sum the same finite binomial series, so
  epsilon over these orders agrees to 1e-9 relative (measured: 1e-14).
* RDP curve at fractional orders: dp-accounting 0.6 sums the absolute values of the (sign-alternating) binomial
  series terms and gives up after 1000 terms, so its value is an upper bound on the exact one, up to 84 % too high
  per order; opacus keeps the signs and matches a direct mpmath quadrature of the Renyi divergence to 1e-8 (checked
  below). Hence on zoo's orders (opacus' defaults and 64..1024: what zoo's "rdp" uses) the comparison is one-sided: zoo <=
  dp-accounting, equal to 1e-9 when zoo's optimal order is an integer, and dp-accounting <= zoo * (1 + 2e-2) while
  epsilon <= 12 (measured worst 8.3e-3, at q=0.3, sigma=5, 1000 steps; this grid stays there, except at q = 1
  where both use the exact closed form). Past that the optimum moves to orders near 2 and below, where
  dp-accounting's series is loosest or does not converge: 3.5e-2 at epsilon 14.7 (q=0.3, sigma=2, 300 steps) and
  up to 2.8 times zoo's epsilon at q=0.3, sigma=0.5, 3000 steps (eval/results/accounting).
* PRV (zoo "prv" = opacus' PRVAccountant) against dp-accounting's PLDAccountant (discretisation 1e-4): opacus
  returns the upper end of its error band (``eps_error=0.01``), so 0 <= zoo - PLD <= 0.015 in absolute epsilon
  (measured 0.0099 to 0.0124 over the eval grid). This is absolute, not relative: at epsilon ~0.01 the two differ
  by a factor 2.
* RDP is an upper bound: zoo "rdp" >= PLD - 1e-3 (measured zoo/PLD >= 1.06 wherever epsilon > 1).
"""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import mpmath
import numpy as np
import pytest
from dp_accounting import rdp
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from zoo.privacy import ACCOUNTANTS, RDP_ORDERS, LargestOrderWarning, compute_epsilon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from crosscheck_accountants import google_pld, google_rdp  # noqa: E402  (one copy of the dp-accounting calls)

ORDERS = list(RDP_ORDERS)
INT_ORDERS = [a for a in ORDERS if float(a).is_integer()]
PRV_EPS_ERROR = 0.01  # opacus' PRVAccountant.get_epsilon default: it returns estimate + this

# (q, sigma, steps, delta): q from 0.005 (CIFAR-10, small batch) to 0.3, q = 1 (full-batch segmentation, ISBI:
# 20 images, batch 20), sigma 0.5..20, 10..3000 steps. Picked so the PLD accountant stays under ~3.5 s per point.
GRID = [
    (0.005, 1.0, 1000, 1e-4), (0.005, 5.0, 10, 1e-5), (0.01, 0.5, 50, 1e-5), (0.01, 1.0, 500, 1e-5),
    (0.02, 2.0, 2000, 1e-4), (0.05, 5.0, 3000, 1e-5), (4096 / 50_000, 3.0, 2500, 1e-5),
    (512 / 4708, 2.0, 400, 1e-4), (8192 / 50_000, 5.0, 2160, 1e-4), (0.3, 2.0, 100, 1e-5),
    (1.0, 3.0, 10, 1e-5), (1.0, 20.0, 300, 1e-4),
]
# fine-tuning on the same data set composes: multi-segment histories
MULTI = [
    ([(1.0, 0.02, 300), (2.0, 0.05, 100)], 1e-5),
    ([(0.8, 0.01, 1000), (3.0, 0.1, 50)], 1e-4),
    ([(3.0, 1.0, 100), (5.0, 1.0, 200)], 1e-4),
]
CASES = [pytest.param([(s, q, n)], d, id=f"q{q:.3g}-sigma{s:g}-steps{n}-delta{d:g}") for q, s, n, d in GRID] + [
    pytest.param(h, d, id="+".join(f"({s:g},{q:g},{n})" for s, q, n in h) + f"-delta{d:g}") for h, d in MULTI]


def dp_rdp(history: list, delta: float, orders=ORDERS) -> float:
    """dp-accounting's RDP epsilon on ``orders`` (default: zoo's orders, like with like)."""
    return google_rdp(history, delta, orders)[0]


def opacus_rdp_curve(history: list) -> np.ndarray:
    return sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=ORDERS) for s, q, n in history)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # opacus: "Optimal order is the largest alpha" (small q; see the eval script)
        warnings.filterwarnings("ignore", message="Optimal order")
        warnings.filterwarnings("ignore", message="divide by zero encountered in log")  # opacus PRV at q = 1: log(0)
        yield


@pytest.mark.parametrize("history,delta", CASES)
def test_rdp_matches_dp_accounting(history, delta):
    zoo_eps = compute_epsilon(history, delta, "rdp")
    curve = opacus_rdp_curve(history)
    # the conversion: same RDP vector, same formula in both libraries
    eps_opacus, opt = get_privacy_spent(orders=ORDERS, rdp=curve, delta=delta)
    eps_google, _ = rdp.compute_epsilon(ORDERS, curve, delta)
    assert zoo_eps == pytest.approx(eps_opacus, rel=1e-12)
    assert eps_google == pytest.approx(eps_opacus, rel=1e-12)
    # like with like: the integer orders, where both compute the same finite series
    acc = ACCOUNTANTS["rdp"]()
    acc.history = [tuple(h) for h in history]
    assert acc.get_epsilon(delta, alphas=INT_ORDERS) == pytest.approx(dp_rdp(history, delta, INT_ORDERS), rel=1e-9)
    # all of opacus' orders: dp-accounting's fractional orders are upper bounds of opacus' exact values
    google = dp_rdp(history, delta)
    assert zoo_eps <= google * (1 + 1e-9)
    assert google <= zoo_eps * (1 + 2e-2)
    if float(opt).is_integer():
        assert google == pytest.approx(zoo_eps, rel=1e-9)


@pytest.mark.parametrize("q,sigma,alpha", [(0.02, 1.0, 2.5), (4096 / 50_000, 5.0, 1.5), (0.3, 1.0, 2.2),
                                           (0.005, 2.0, 3.5)])
def test_opacus_fractional_order_rdp_is_exact(q, sigma, alpha):
    """Ground truth for the fractional orders, where the two libraries differ: the Renyi divergence of the sampled
    Gaussian mixture (1-q) N(0, s^2) + q N(1, s^2) from N(0, s^2) (Mironov et al. 2019, the larger of the two
    directions), integrated by mpmath at 30 digits."""
    mpmath.mp.dps = 30
    s, a, qq = mpmath.mpf(sigma), mpmath.mpf(alpha), mpmath.mpf(q)
    f = lambda z: mpmath.npdf(z, 0, s) * ((1 - qq) + qq * mpmath.exp((2 * z - 1) / (2 * s ** 2))) ** a  # noqa: E731
    exact = float(mpmath.log(mpmath.quad(f, [-mpmath.inf, -20 * s, 0, 0.5, 1, 20 * s + 40 * a, mpmath.inf]))
                  / (a - 1))
    ours = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0]
    assert ours == pytest.approx(exact, rel=1e-8)
    google = rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, sigma, [alpha])[0]
    assert google >= exact * (1 - 1e-9)  # dp-accounting: a valid, looser bound


@pytest.mark.parametrize("history,delta", CASES)
def test_prv_matches_pld_and_rdp_bounds_it(history, delta):
    tight = google_pld(history, delta)
    prv = compute_epsilon(history, delta, "prv")
    assert 0 <= prv - tight <= PRV_EPS_ERROR + 0.005, (prv, tight)
    assert compute_epsilon(history, delta, "rdp") >= tight - 1e-3  # RDP is an upper bound on the tight epsilon


@pytest.mark.parametrize("accountant", sorted(ACCOUNTANTS))
def test_no_steps_and_no_noise(accountant):
    """Empty history and zero-step segments spend nothing; one noise-free segment anywhere voids the guarantee, as
    in dp-accounting (test_tasks covers sigma = 0 alone for "rdp")."""
    assert compute_epsilon([], 1e-5, accountant) == 0.0 == dp_rdp([], 1e-5) == google_pld([], 1e-5)
    assert compute_epsilon([(1.0, 0.1, 0), (0.0, 0.1, 0)], 1e-5, accountant) == 0.0
    assert compute_epsilon([(2.0, 0.02, 0)] + [(1.0, 0.02, 30)], 1e-5, accountant) == pytest.approx(
        compute_epsilon([(1.0, 0.02, 30)], 1e-5, accountant), rel=1e-12)
    noisy_then_free = [(1.0, 0.02, 30), (0.0, 0.02, 5)]
    assert compute_epsilon(noisy_then_free, 1e-5, accountant) == math.inf
    assert dp_rdp(noisy_then_free, 1e-5) == math.inf == google_pld(noisy_then_free, 1e-5)


@pytest.mark.parametrize("history,delta", [([(5.0, 0.005, 10)], 1e-5), ([(1.0, 0.02, 300)], 1e-5),
                                           ([(10.9, 1024 / 4708, 200)], 1e-4), ([(35.0, 1.0, 100)], 1e-4)])
def test_more_orders_only_tighten_epsilon_and_opacus_warning_is_gone(history, delta):
    """zoo's orders extend opacus' defaults: epsilon is never larger (strictly smaller where opacus' optimum was its
    largest order, 63), and opacus' "Optimal order is the largest alpha" warning no longer appears."""
    acc = RDPAccountant()
    acc.history = history
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old, old_order = acc.get_privacy_spent(delta=delta)
        new = compute_epsilon(history, delta, "rdp")
    assert new <= old * (1 + 1e-12)
    if old_order == max(RDPAccountant.DEFAULT_ALPHAS):
        assert new < old * 0.99
    assert not [w for w in caught if "Optimal order" in str(w.message) and w.filename.endswith("accounting.py")]
    assert not [w for w in caught if issubclass(w.category, LargestOrderWarning)]


def test_largest_order_is_said_in_words():
    with pytest.warns(LargestOrderWarning, match="best order is its largest .*PRV accountant"):
        eps = compute_epsilon([(100.0, 0.01, 10)], 1e-5, "rdp")
    assert 0 < eps < 0.01
