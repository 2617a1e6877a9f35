"""A DP recipe chosen for your data: delta, batch size, steps and augmentation from N and epsilon.

A card's recipe is tuned for the card's own data set (e.g. CIFAR-10's N = 50,000). On data given by path
(:mod:`zoo.data.folder`) zoo chooses instead the settings that depend on N and epsilon. It keeps the model's own
optimiser settings (learning rate, momentum, clip norm, EMA), which belong to the architecture. The rules, and
where they come from:

- **delta**: the largest power of ten below 1/N (1e-4 for N = 4,708), the convention of the DP literature (De et
  al. 2022 use 1e-5 at N = 50,000).
- **compute budget** M (samples x views through the per-sample gradient): 40 epochs, clamped to
  [:data:`MIN_BUDGET`, :data:`MAX_BUDGET`]. That is what the release tier's CPU study trained at (PneumoniaMNIST:
  204,800 samples, 43 epochs; CIFAR-10: 491,520, 10 epochs, clamped). It takes minutes on 2 CPU cores for the
  ScatterNet models and under an hour for a WRN-16-1.
- **batch size and steps**: TAN (Sander et al. 2023, :mod:`zoo.dp.tan`). At fixed (epsilon, delta, N, S) the noise on
  the averaged gradient sigma / B is fixed, so at a fixed budget B x S the choice is only how to split it. The
  studies found, at equal budget: a sampling rate q = B / N near :data:`SAMPLE_RATE` (PneumoniaMNIST ScatterNet:
  q = 0.43 ahead of 0.22 at epsilon 1, 3 and 8), and at least :data:`MIN_STEPS` steps (CIFAR-10 ScatterNet: 60
  steps ahead of 30). So S = M / (q N), clamped to [MIN_STEPS, MAX_STEPS], and B = M / S.
- **augmentation multiplicity** K = 1: K views multiply the compute of a step, and at these budgets the release
  study trained every model with K = 1 (De et al.'s gains from K = 16 come at 100x more compute).
- **sigma** is then calibrated by the accountant for exactly these (q, S, epsilon, delta): the guarantee never
  rests on a rule.

Explicit settings always win: only the fields the caller did not give are chosen. The choice and its reasons are
printed and recorded in the privacy ledger (``recipe_choice``).
"""
from __future__ import annotations

import math

from zoo.dp.accounting import calibrate_sigma

MIN_BUDGET, MAX_BUDGET, EPOCHS = 100_000, 500_000, 40
SAMPLE_RATE = 0.3
MIN_STEPS, MAX_STEPS = 60, 2500
CHOSEN = ("delta", "batch_size", "steps", "augmult")
"""The recipe fields this module chooses (the rest come from the model's card)."""


def delta_for(n: int) -> float:
    """The largest power of ten strictly below ``1 / n``."""
    d = 10.0 ** -math.ceil(math.log10(n))
    return d / 10 if d >= 1 / n else d


def choose(n: int, epsilon: float, given: dict, accountant: str = "rdp") -> tuple[dict, dict]:
    """``(values, record)`` for a data set of ``n`` training samples at ``epsilon``: the :data:`CHOSEN` fields
    that ``given`` (the caller's explicit settings) lacks, and the ledger's ``recipe_choice`` record (rule, values,
    reasons, and which fields were given)."""
    delta = given.get("delta") or delta_for(n)
    augmult = given.get("augmult") or 1
    budget = max(MIN_BUDGET, min(MAX_BUDGET, EPOCHS * n))
    if given.get("batch_size") and given.get("steps"):
        batch, steps = int(given["batch_size"]), int(given["steps"])
    elif given.get("batch_size"):
        batch = int(given["batch_size"])
        steps = max(1, round(budget / (batch * augmult)))
    elif given.get("steps"):
        steps = int(given["steps"])
        batch = max(1, min(n, round(budget / (steps * augmult))))
    else:
        steps = max(MIN_STEPS, min(MAX_STEPS, round(budget / (augmult * SAMPLE_RATE * n))))
        batch = max(1, min(n, round(budget / (augmult * steps))))
    if batch > n:
        raise ValueError(f"batch_size {batch} exceeds the {n} training samples; pass a smaller --batch-size (or "
                         "none: zoo then chooses one)")
    values = {k: v for k, v in {"delta": delta, "batch_size": batch, "steps": steps, "augmult": augmult}.items()
              if k not in given or given[k] is None}
    sigma = None if math.isinf(epsilon) else calibrate_sigma(epsilon, delta, batch / n, steps, accountant)
    reasons = {
        "delta": f"largest power of ten below 1/N = {1 / n:.2e}",
        "budget": f"{budget:,} samples x views ({EPOCHS} epochs of N = {n:,}, clamped to [{MIN_BUDGET:,}, "
                  f"{MAX_BUDGET:,}]: what the release study trained at on 2 CPU cores)",
        "batch_size_and_steps": f"TAN: at a fixed budget only the split of B x S matters; q = B/N near "
                                f"{SAMPLE_RATE} and S >= {MIN_STEPS} did best in the release study",
        "augmult": "K = 1: K views multiply the cost of a step; the release study used K = 1 at these budgets",
        "sigma": "calibrated by the accountant for exactly this q, S, epsilon and delta",
    }
    record = {"rule": "zoo.training.auto_recipe (TAN and the release tier's CPU study)", "num_samples": n,
              "chosen": values, "given": sorted(k for k in CHOSEN if given.get(k) is not None),
              "sample_rate": batch / n, "sigma": sigma, "budget_samples": batch * steps * augmult,
              "reasons": reasons}
    return values, record


def describe(record: dict) -> str:
    """The choice in words, for the terminal."""
    c, r = record["chosen"], record["reasons"]
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()]
    sigma = "no noise (epsilon = inf)" if record["sigma"] is None else f"sigma {record['sigma']:.3f}"
    return (f"recipe chosen for N={record['num_samples']:,} (zoo.training.auto_recipe): {', '.join(parts) or 'nothing'}"
            f" (q={record['sample_rate']:.3f}, {sigma}; {record['budget_samples']:,} samples x views). "
            f"delta: {r['delta']}; budget: {r['budget']}; B and S: {r['batch_size_and_steps']}; {r['augmult']}. "
            "Explicit flags override any of these; pass --recipe card for the card's own recipe.")
