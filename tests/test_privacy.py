"""The DP engine's guarantees: clipping, noise scale, accounting, budget stop, empty batches, augmult."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import zoo
from zoo.dp.step import add_noise, clip_per_sample, poisson_batch, step_generator
from zoo.dp.grad_sample import PerSampleGradients
from zoo.privacy import BudgetExhaustedError, Ledger, calibrate_sigma, compute_epsilon


def test_every_clipped_gradient_has_norm_at_most_c():
    model = zoo.create_model("test-wrn10-1")
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    grads = zoo.per_sample_gradients(model, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    c = norms.median().item()  # half the samples are clipped, half are not
    assert (norms > c).any() and (norms < c).any()
    for i in range(8):  # clip each sample alone: its contribution to the sum is its clipped gradient
        summed, _ = clip_per_sample({n: g[i:i + 1] for n, g in grads.items()}, c)
        norm_i = torch.sqrt(sum(s.pow(2).sum() for s in summed.values()))
        assert norm_i <= c * (1 + 1e-6)
        if norms[i] < c:  # gradients inside the ball are untouched (up to the 1e-6 guard)
            assert math.isclose(norm_i.item(), norms[i].item(), rel_tol=1e-5)


def test_noise_std_matches_sigma_c():
    sigma, c = 1.7, 0.3
    zeros = {"w": torch.zeros(400_000, dtype=torch.float64)}
    noisy = add_noise(zeros, sigma * c, torch.Generator().manual_seed(0))["w"]
    assert abs(noisy.std().item() / (sigma * c) - 1) < 0.01
    assert abs(noisy.mean().item()) < 0.01 * sigma * c


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_agrees_with_opacus_stepping(accountant):
    """The ledger (history as segments) and opacus' accountant stepped one step at a time agree."""
    ledger = Ledger(dataset="d", num_samples=50_000, delta=1e-5, accountant=accountant, clip_norm=1.0,
                    target_epsilon=8.0)
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for sigma, q, steps in [(1.1, 0.01, 120), (2.0, 0.02, 80)]:
        for _ in range(steps):
            ledger.record(sigma, q)
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert ledger.steps == 200
    assert math.isclose(ledger.epsilon(), acc.get_epsilon(delta=1e-5), rel_tol=1e-6)


@pytest.mark.parametrize("eps,q,steps", [(1.0, 4096 / 50_000, 875), (8.0, 4096 / 50_000, 2500), (3.0, 0.01, 500)])
def test_calibration_matches_opacus(eps, q, steps):
    sigma = calibrate_sigma(eps, 1e-5, q, steps, "rdp")
    ref = get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
    assert abs(sigma - ref) / ref < 0.01
    spent = compute_epsilon([(sigma, q, steps)], 1e-5, "rdp")
    assert eps - 0.01 <= spent <= eps


def test_calibration_with_history_spends_exactly_the_rest():
    history = [(1.0, 0.02, 300)]
    spent = compute_epsilon(history, 1e-5)
    sigma = calibrate_sigma(spent + 2.0, 1e-5, 0.02, 200, history=history)
    assert spent + 2.0 - 0.01 <= compute_epsilon([*history, (sigma, 0.02, 200)], 1e-5) <= spent + 2.0
    with pytest.raises(BudgetExhaustedError, match="already spent"):
        calibrate_sigma(spent, 1e-5, 0.02, 10, history=history)


def test_steps_left_stops_at_the_budget():
    ledger = Ledger(dataset="d", num_samples=10_000, delta=1e-5, accountant="rdp", clip_norm=1.0, target_epsilon=2.0)
    n = ledger.steps_left(2.0, 0.01, 10_000)
    assert 0 < n < 10_000
    assert compute_epsilon([(2.0, 0.01, n)], 1e-5) <= 2.0 < compute_epsilon([(2.0, 0.01, n + 1)], 1e-5)


def test_ledger_rejects_delta_not_below_one_over_n():
    with pytest.raises(ValueError, match="1/N"):
        Ledger(dataset="d", num_samples=1000, delta=1e-3, accountant="rdp", clip_norm=1.0, target_epsilon=1.0)


def test_edited_ledger_is_refused():
    ledger = Ledger(dataset="d", num_samples=1000, delta=1e-5, accountant="rdp", clip_norm=1.0, target_epsilon=8.0,
                    history=[[1.0, 0.1, 50]])
    d = ledger.to_dict()
    d["epsilon"] = 0.5
    with pytest.raises(ValueError, match="edited"):
        Ledger.from_dict(d)


def test_empty_poisson_batch():
    model = zoo.create_model("test-wrn10-1")
    psg = PerSampleGradients(model)
    grads, losses, _ = psg(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    assert all(g.shape == (0, *p.shape) for g, p in zip(grads.values(), model.parameters()))
    summed, _ = clip_per_sample(grads, 1.0)
    assert all(s.abs().sum() == 0 and s.shape == p.shape for s, p in zip(summed.values(), model.parameters()))
    psg.close()
    # with q = 1/200 and N = 200, some steps draw no sample at all
    sizes = [len(poisson_batch(200, 1 / 200, step_generator(0, s, "sample", torch.device("cpu")))) for s in range(20)]
    assert 0 in sizes and max(sizes) > 0


def test_augmult_averages_views_before_clipping():
    model = zoo.create_model("test-resnet9-w8").double()
    psg = PerSampleGradients(model)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)  # 3 samples x 2 views
    y = torch.tensor([2, 2, 5, 5, 7, 7])
    grads, _, _ = psg(x, y, views=2)
    single, _, _ = psg(x, y)
    for n, g in grads.items():
        assert g.shape[0] == 3
        assert torch.allclose(g, single[n].view(3, 2, *g.shape[1:]).mean(1), rtol=1e-10, atol=1e-12)
    psg.close()


def test_bad_inputs_get_clear_errors():
    model = zoo.create_model("test-wrn10-1")
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="NaN"):
        zoo.per_sample_gradients(model, torch.full((2, 3, 32, 32), float("nan")), y)
    with pytest.raises(ValueError, match="out of range"):
        zoo.per_sample_gradients(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        zoo.per_sample_gradients(model, torch.randn(2, 1, 32, 32), y)
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 8x8"):
        zoo.create_model("test-resnet9-w8")(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="loss_fn must return one loss per sample"):
        zoo.per_sample_gradients(model, torch.randn(2, 3, 32, 32), y, loss_fn=lambda o, t: F.cross_entropy(o, t))


def test_a_per_sample_norm_that_overflows_stops_the_step_instead_of_dropping_the_sample():
    """Finite entries (1e19) whose float32 norm is inf would get a clip factor of 0: refused, not silently dropped."""
    from zoo.dp.grad_sample import NonFiniteGradientError

    with pytest.raises(NonFiniteGradientError, match="overflow"):
        clip_per_sample({"w": torch.full((2, 4), 1e19), "b": torch.ones(2, 3)}, 1.0)
