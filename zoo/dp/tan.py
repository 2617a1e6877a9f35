"""Privacy parameters without knowing the model: TAN's scaling laws (Sander, Stock, Sablayrolles 2023).

With sampling rate ``q = B / N``, ``S`` steps and noise multiplier ``sigma``, TAN's "total amount of noise" is
``eta^2 = q^2 S / (2 sigma^2)`` and, for ``sigma`` of about 2 or more, the RDP accountant's epsilon is close to
``eta^2 + 2 eta sqrt(log(1/delta))`` (:func:`closed_form_epsilon`). Two consequences drive :func:`propose`:

1. At fixed ``(epsilon, delta)`` eta is fixed, so ``sigma / B = sqrt(S / 2) / (eta N)``: the noise on the
   averaged gradient does not depend on the batch size, only on the number of steps and the data set size.
   A larger batch then only lowers the sampling variance of the gradient, at a proportional compute cost.
2. The closed form (and TAN's observation that accuracy follows ``sigma / B`` at fixed ``S``) holds while
   ``sigma`` stays above about 2; below that, growing the batch stops paying. TAN's CIFAR-10 reference,
   ``B = 4096, sigma = 3, S = 2500`` at ``epsilon = 8`` for ``N = 50,000``, sits at ``sigma = 3``.

So :func:`propose` fixes ``S`` (TAN's 2500 unless given) and a target ``sigma`` (3), solves the batch size from
the closed form, and then calibrates ``sigma`` exactly with the accountant for that batch: the closed form only
chooses B, the guarantee always comes from the accountant. :func:`scale_down` gives TAN's cheap simulation of a
recipe for hyper-parameter search (same ``S`` and ``sigma / B``, smaller ``B``): it predicts the utility of
the full run, and it is *not* private at the full run's epsilon (its own epsilon is much larger).
"""
from __future__ import annotations

import math

from zoo.dp.accounting import calibrate_sigma, compute_epsilon

TAN_STEPS, TAN_SIGMA = 2500, 3.0


def eta(sample_rate: float, steps: int, sigma: float) -> float:
    """TAN's total amount of noise: ``eta = q sqrt(S / 2) / sigma``."""
    return sample_rate * math.sqrt(steps / 2.0) / sigma


def closed_form_epsilon(sample_rate: float, steps: int, sigma: float, delta: float) -> float:
    """``eta^2 + 2 eta sqrt(log(1/delta))``: TAN's approximation of the RDP epsilon (good for sigma >~ 2)."""
    e = eta(sample_rate, steps, sigma)
    return e * e + 2.0 * e * math.sqrt(math.log(1.0 / delta))


def eta_for_epsilon(epsilon: float, delta: float) -> float:
    """The eta at which the closed form reaches ``epsilon``: the positive root of ``eta^2 + 2 eta L = eps``."""
    lg = math.sqrt(math.log(1.0 / delta))
    return math.sqrt(lg * lg + epsilon) - lg


def propose(epsilon: float, delta: float, dataset_size: int, steps: int = TAN_STEPS, sigma: float = TAN_SIGMA,
            accountant: str = "rdp") -> dict:
    """Batch size, noise multiplier and steps for ``(epsilon, delta)`` on ``dataset_size`` samples, knowing
    nothing of the model (see the module docstring for the reasoning).

    Returns ``batch_size``, ``sigma`` (calibrated by the accountant for ``q = batch_size / N`` and ``steps``),
    ``steps``, ``sample_rate``, ``eta``, ``sigma_over_batch`` and both epsilons (accountant, closed form).
    """
    if not 0 < delta < 1.0 / dataset_size:
        raise ValueError(f"delta must be in (0, 1/N) = (0, {1.0 / dataset_size:.2e}) for N={dataset_size}")
    if epsilon <= 0 or steps < 1 or sigma <= 0:
        raise ValueError("epsilon, steps and sigma must be positive")
    e = eta_for_epsilon(epsilon, delta)
    noise_per_sample = math.sqrt(steps / 2.0) / (e * dataset_size)  # sigma / B, fixed by (epsilon, S, N)
    batch = max(1, min(dataset_size, round(sigma / noise_per_sample)))
    q = batch / dataset_size
    calibrated = calibrate_sigma(epsilon, delta, q, steps, accountant)
    return {"batch_size": batch, "sigma": calibrated, "steps": steps, "sample_rate": q, "eta": e,
            "sigma_over_batch": calibrated / batch,
            "epsilon": compute_epsilon([(calibrated, q, steps)], delta, accountant),
            "closed_form_epsilon": closed_form_epsilon(q, steps, calibrated, delta), "accountant": accountant}


def noise_to_signal(num_params: int, sigma: float, batch_size: float, steps: int) -> float:
    """How far the noise of a whole DP-SGD run outweighs its signal, at best: ``sqrt(d) sigma / (B sqrt(S))``.

    Over ``S`` steps the averaged clipped gradients sum to a vector of norm at most ``S C`` (every per-sample
    gradient clipped to ``C`` and all of them aligned, the best case), while the noise sums to a Gaussian vector of
    norm about ``sqrt(S d) sigma C / B`` over the ``d`` trained parameters. Their ratio is this function; the real
    signal is smaller (per-sample gradients disagree and change), so the real ratio is larger. Learning rate,
    momentum and a schedule weight both sums alike and leave it unchanged. Above about 1 the noise's random walk is
    longer than the whole signal's walk: train fewer parameters (``trainable``) or spend more privacy."""
    if num_params < 1 or sigma < 0 or batch_size <= 0 or steps < 1:
        raise ValueError("num_params, batch_size and steps must be positive and sigma >= 0")
    return math.sqrt(num_params) * sigma / (batch_size * math.sqrt(steps))


def noise_to_signal_for(epsilon: float, delta: float, dataset_size: int, num_params: int) -> float:
    """:func:`noise_to_signal` of any recipe that spends ``(epsilon, delta)`` on ``dataset_size`` samples, by TAN's
    closed form: ``sigma / B = sqrt(S / 2) / (eta N)`` makes it ``sqrt(d) / (sqrt(2) eta N)``, the same for every
    batch size and number of steps (recipes calibrated by the accountant with ``sigma >= 2`` come out 0.75 to 1
    times this; below ``sigma`` of about 2 a batch too small costs more). So at a given budget only the number of trained parameters ``d`` and the data
    set size ``N`` move it: on CIFAR-10 (N = 50,000, epsilon = 8) a 1M-parameter network sits near 0.01, on the
    20 slices of ISBI 2012 a 30k-parameter U-Net near 5."""
    if epsilon <= 0 or dataset_size < 1 or num_params < 1:
        raise ValueError("epsilon, dataset_size and num_params must be positive")
    return math.sqrt(num_params) / (math.sqrt(2.0) * eta_for_epsilon(epsilon, delta) * dataset_size)


def scale_down(batch_size: int, sigma: float, steps: int, small_batch: int) -> dict:
    """TAN's simulation of a ``(batch_size, sigma, steps)`` recipe at ``small_batch``: same steps and same
    ``sigma / B`` (so ``sigma`` shrinks by ``small_batch / batch_size``). For hyper-parameter search only: the
    simulated run spends far more than the full run's epsilon; never report it as private at that epsilon."""
    if not 0 < small_batch <= batch_size:
        raise ValueError(f"small_batch must be in (0, {batch_size}], got {small_batch}")
    return {"batch_size": small_batch, "sigma": sigma * small_batch / batch_size, "steps": steps}
