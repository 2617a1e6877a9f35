"""The one-run privacy audit (eval/audit_privacy.py): the Steinke et al. 2023 bound on its own, the Dirac canaries
through zoo's clipping, and a real audit of zoo's DP-SGD on a CIFAR-10 subset (bound below the claim with DP,
far above it without noise)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from audit_privacy import (DiracCanaryGradients, audit, canary_run, epsilon_lower_bound,  # noqa: E402
                           guesses, max_bound, p_value)
import zoo  # noqa: E402
from zoo.dp.step import clip_per_sample  # noqa: E402
from zoo.dp.grad_sample import PerSampleGradients  # noqa: E402
from zoo.catalog.registry import build, get_card  # noqa: E402


def test_all_correct_guesses_give_a_bound_that_grows_with_r_and_random_guessing_gives_none():
    bounds = [epsilon_lower_bound(1000, r, r, 1e-5) for r in (10, 50, 100, 300, 1000)]
    assert all(a < b for a, b in zip(bounds, bounds[1:])) and bounds[0] > 0
    assert epsilon_lower_bound(1000, 300, 150, 1e-5) == 0.0  # half right: chance
    assert epsilon_lower_bound(1000, 300, 160, 1e-5) == 0.0  # within chance at 95%
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0     # no guesses, no evidence


def test_bound_is_monotone_in_correct_guesses_and_in_delta():
    r = 200
    by_v = [epsilon_lower_bound(1000, r, v, 1e-5) for v in range(100, r + 1, 5)]
    assert all(a <= b for a, b in zip(by_v, by_v[1:])) and by_v[-1] > 4
    by_delta = [epsilon_lower_bound(1000, r, 190, d) for d in (0.0, 1e-7, 1e-5, 1e-4)]
    assert all(a >= b for a, b in zip(by_delta, by_delta[1:]))  # a larger delta explains more: a weaker bound
    assert by_delta[1] == pytest.approx(by_delta[0], abs=1e-3)
    assert epsilon_lower_bound(1000, r, 190, 0.05, 0.05) == 0.0  # 2 m delta >= 1: nothing can be rejected


def test_delta_zero_is_the_binomial_tail_bound():
    beta = 0.05
    for r in (20, 100, 500):  # all correct: P[Bin(r, p) >= r] = p^r = beta in closed form
        p = beta ** (1 / r)
        assert epsilon_lower_bound(10 ** 4, r, r, 0.0, beta) == pytest.approx(math.log(p / (1 - p)), rel=1e-8)
    eps = epsilon_lower_bound(1000, 300, 220, 0.0, beta)
    assert stats.binom.sf(219, 300, special.expit(eps)) == pytest.approx(beta, rel=1e-6)
    assert p_value(1000, 300, 220, eps, 0.0) == pytest.approx(beta, rel=1e-6)


def test_p_value_matches_the_theorem_term_by_term():
    m, r, v, eps, delta = 500, 40, 33, 1.0, 1e-4
    p = special.expit(eps)
    f = lambda u: stats.binom.sf(u - 1, r, p)  # noqa: E731  P[Bin(r, p) >= u]
    want = f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_bound_is_valid_and_nearly_tight_for_randomized_response(eps):
    """Randomized response is exactly eps-DP: each guess is right with probability e^eps / (1 + e^eps). The
    probability (exact, over all v) that the bound exceeds eps must be at most beta, and not far below it."""
    r, beta = 120, 0.05
    pmf = stats.binom.pmf(np.arange(r + 1), r, special.expit(eps))
    wrong = sum(pmf[v] for v in range(r + 1) if epsilon_lower_bound(1000, r, v, 0.0, beta) > eps)
    assert beta / 3 < wrong <= beta
    rng = np.random.default_rng(0)  # and by Monte Carlo, with delta: still valid
    draws = rng.binomial(r, special.expit(eps), 1000)
    exceeds = {v: epsilon_lower_bound(1000, r, int(v), 1e-5, beta) > eps for v in np.unique(draws)}
    assert np.mean([exceeds[v] for v in draws]) <= beta + 0.02


def test_guesses_count_correct_in_and_out_calls():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    members = np.array([True, False, True, False, False, True])
    assert guesses(scores, members, 2) == (4, 2)  # in: 5 (right), 4 (wrong); out: 0 (wrong), 1 (right)
    assert guesses(scores, members, 1) == (2, 1)
    res = audit(scores, members, [1, 2, 3], delta=0.0)
    assert res["beta"] == pytest.approx(0.05 / 3) and len(res["per_k"]) == 3 and res["epsilon"] == 0.0


def test_dirac_canaries_are_clipped_to_exactly_c_at_their_own_coordinate():
    net = build(get_card("test-wrn10-1"), num_classes=10, in_chans=3)
    psg = PerSampleGradients(net)
    total = sum(p.numel() for p in psg.params.values())
    coords = torch.tensor([0, 7, total - 1, 500])
    wrapped = DiracCanaryGradients(psg, coords, 2.5)
    wrapped.pending = torch.tensor([3, 1, 2])
    grads, losses, _ = wrapped(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    assert flat.shape == (3, total) and len(losses) == 0
    assert torch.equal(flat.nonzero()[:, 1], coords[[3, 1, 2]]) and torch.all(flat.sum(1) == 2.5)
    summed, norms = clip_per_sample(grads, 1.0)  # zoo's clipping: C on each canary's coordinate, nothing else
    assert torch.allclose(norms, torch.full((3,), 2.5))
    assert wrapped.released(summed).tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0], abs=1e-6)
    assert len(wrapped.pending) == 0  # used once
    psg.close()


def test_audit_of_zoo_dp_sgd_stays_below_the_claim_and_rises_far_above_it_without_noise(data_dir):
    """One real run each through zoo's DP step (test-wrn10-1, 10 CIFAR-10 images + ~500 included canaries of
    m = 1000, q ~ 0.3, 20 steps: an included canary goes unsampled with probability 0.7^20 < 0.001; k = 250
    guesses each way). With zoo's calibrated noise the 95% lower bound must
    stay below the claimed epsilon 2; without noise it must exceed twice the claim (the most these k allow is
    5.09). Missing noise or clipping, a sigma too small or an optimistic bound would break one of these."""
    kw = dict(canaries=1000, steps=20, batch_size=150, train_subset=10, seed=0, data_dir=data_dir)
    dp = canary_run("test-wrn10-1", epsilon=2.0, **kw)
    free = canary_run("test-wrn10-1", epsilon=math.inf, **kw)
    assert 0 < dp["sigma"] and free["sigma"] == 0 and math.isinf(free["epsilon_claimed"])
    assert 1.9 <= dp["epsilon_claimed"] <= 2.0 and dp["steps"] == free["steps"] == 20
    assert dp["N"] == 10 + dp["included"] and 400 < dp["included"] < 600
    assert dp["q"] == 150 / (10 + 1000 / 2)  # public: fixed before membership is drawn
    res_dp = audit(dp["scores"], dp["members"], [250], dp["delta"])
    res_free = audit(free["scores"], free["members"], [250], free["delta"])
    print(f"\nclaimed epsilon {dp['epsilon_claimed']:.3f} (sigma {dp['sigma']:.3f}): {res_dp['v']}/{res_dp['r']} "
          f"correct, bound {res_dp['epsilon']:.3f}; no noise: {res_free['v']}/{res_free['r']}, "
          f"bound {res_free['epsilon']:.3f} (max {max_bound(1000, [250], 1e-5):.3f})")
    assert res_dp["epsilon"] <= dp["epsilon_claimed"]
    assert res_free["epsilon"] > 2 * dp["epsilon_claimed"]
    # without noise an included canary's score is C per time it was sampled (plus the real samples' gradients):
    # its mean is q * steps; unclipped Dirac gradients (2C) would double it
    mem = free["members"]
    assert free["scores"][mem].mean() == pytest.approx(free["q"] * 20, rel=0.1)
    assert abs(free["scores"][~mem].mean()) < 0.1


def test_without_canaries_the_audit_trains_exactly_what_zoo_train_trains(data_dir):
    """The audit runs zoo's own DP step (zoo.dp.step.DPStep), not a copy: without canaries, its run of test-wrn10-1
    and ``zoo.train``'s run with the same seed and recipe (sampling, views, clipping, noise, division, update) end
    in bit-identical weights. A change to the step that training uses and the audit does not is caught here."""
    kw = dict(epsilon=4.0, steps=3, batch_size=8, train_subset=32, seed=0)
    audited = canary_run("test-wrn10-1", canaries=0, data_dir=data_dir, **kw)["model"]
    trained = zoo.train("test-wrn10-1", data_dir=data_dir, augmult=1, ema_decay=0.0, test_subset=16, progress=False,
                        **kw)
    assert audited.state_dict().keys() == trained["model_object"].state_dict().keys()
    torch.manual_seed(0)
    init = zoo.create_model("test-wrn10-1").state_dict()  # where both runs started (seed 0)
    for name, value in trained["model_object"].state_dict().items():
        assert torch.equal(audited.state_dict()[name], value), name
    assert any(not torch.equal(v, init[k]) for k, v in trained["model_object"].state_dict().items())  # it trained
