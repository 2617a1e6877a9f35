"""Privacy accounting: noise calibration, the privacy ledger, and the budget rule (public as :mod:`zoo.privacy`).

Guarantee assumed throughout: DP-SGD with Poisson sampling at rate q (each sample joins each step's batch
independently with probability q), per-sample clipping to L2 norm C of the whole gradient (after averaging
a sample's augmented views), and Gaussian noise of standard deviation sigma*C added to the sum of clipped
gradients. The neighbouring relation is add/remove-one sample of the training set. epsilon is computed by
opacus' RDP or PRV accountant from the exact (sigma, q, steps) history that training used.

Cross-checked against Google's dp-accounting (tests/test_accounting.py; a larger grid and zoo's card settings in
eval/crosscheck_accountants.py): "rdp" equals dp-accounting's RDP over the same integer orders to 1e-9 relative
(the RDP -> epsilon conversion is the same; at fractional orders dp-accounting 0.6 is looser: zoo <= it, and
<= zoo * 1.02 up to epsilon 12); "prv" lies 0 to 0.015 in epsilon above dp-accounting's PLD; "rdp" is never
below PLD by more than 1e-3.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}
RDP_ORDERS = (*RDPAccountant.DEFAULT_ALPHAS, *range(64, 128, 4), *range(128, 256, 16), 256, 320, 384, 448, 512, 640,
              768, 896, 1024)
"""The Renyi orders of the "rdp" accountant: opacus' defaults (1.1 to 10.9 by 0.1, 12 to 63), then up to 1024.
At small epsilon or large sigma the best order lies above 63, where opacus' defaults stop (and it warns "Optimal order
is the largest alpha" on every call); more orders only ever tighten epsilon (it is a minimum over them), and the
added ones cost microseconds. When even 1024 is the best, zoo says so once (:class:`LargestOrderWarning`)."""
NEIGHBOURING = "add/remove-one sample (Poisson sampling)"


class BudgetExhaustedError(RuntimeError):
    """The privacy budget does not allow (more) training."""


def _accountant(name: str):
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}") from None


def compute_epsilon(history: list, delta: float, accountant: str = "rdp") -> float:
    """epsilon after the composition of ``history`` = [(sigma, q, steps), ...] (opacus' format) at ``delta``."""
    history = [tuple(h) for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(h[0] == 0 for h in history):  # a noise-free step (the epsilon=inf reference) has no guarantee
        return math.inf
    acc = _accountant(accountant)
    acc.history = history
    if accountant != "rdp":
        with np.errstate(divide="ignore"):  # opacus' PRV takes log(1 - q): -inf, handled, at q = 1 (zoo.dp.data_norm)
            return float(acc.get_epsilon(delta=delta))
    with warnings.catch_warnings():  # opacus warns at the largest order on every call: said once, below
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, order = acc.get_privacy_spent(delta=delta, alphas=RDP_ORDERS)
    if order >= RDP_ORDERS[-1]:
        warnings.warn(f"the RDP accountant's best order is its largest ({RDP_ORDERS[-1]}), so epsilon {eps:.4g} is "
                      "valid but may be loose; for such tiny budgets the PRV accountant (accountant 'prv') is "
                      "tighter", LargestOrderWarning, stacklevel=2)
    return float(eps)


class LargestOrderWarning(UserWarning):
    """The RDP accountant's optimum is its largest order: epsilon is an upper bound that more orders would tighten.
    Shown once per place in the code (Python's default warning filter)."""


def calibrate_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", history: list = (), tol: float = 0.01) -> float:
    """Smallest noise multiplier (within ``tol`` in epsilon) such that ``history`` followed by ``steps``
    steps at ``sample_rate`` spends at most ``target_epsilon``. Same bisection as opacus'
    ``get_noise_multiplier``, extended to a prior history (fine-tuning on the same data composes)."""
    spent = compute_epsilon(list(history), delta, accountant)
    if spent >= target_epsilon:
        raise BudgetExhaustedError(
            f"epsilon {spent:.3f} is already spent on this data set, target is {target_epsilon}; "
            "raise the target epsilon or train on other data")
    eps = lambda s: compute_epsilon([*history, (s, sample_rate, steps)], delta, accountant)  # noqa: E731
    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 5000:
            raise BudgetExhaustedError(f"target epsilon {target_epsilon} is unreachable with q={sample_rate}, "
                                       f"{steps} steps; use fewer steps or a smaller batch")
    while True:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e < target_epsilon:
            hi = mid
            if target_epsilon - e <= tol:
                return hi
        else:
            lo = mid


@dataclass
class Ledger:
    """What was spent on one data set. Travels with every checkpoint (JSON sidecar).

    ``history`` is opacus' accountant history ``[(sigma, q, steps), ...]``; epsilon is recomputed from it,
    never stored alone. ``parent`` holds the ledger of pre-training on another data set (for the record: its
    guarantee is about that other data set and does not compose with this one). ``pretraining`` says what the
    weights started from when that was another data set: its name, whether it was trained privately (its epsilon)
    or is public data with respect to this data set, and the starting checkpoint's sha256. ``augmult`` is the
    number K of augmented views per sample (averaged before clipping: it does not change the sensitivity).
    ``manifest`` describes the content of data given by path (:mod:`zoo.data.folder`: a sha256 over it), so that the
    ledger is tied to those images and not to a folder name. ``recipe_choice`` records how delta, batch size and
    steps were chosen when zoo chose them for the data (:mod:`zoo.training.auto_recipe`). ``statistics`` lists the private
    releases made before DP-SGD on the same data (:mod:`zoo.dp.data_norm`: a layer's normalisation statistics, each
    entry with its ``sigma``, ``sample_rate`` and number of ``releases``); they compose with ``history``
    (:attr:`accounted`), but are not DP-SGD steps.
    """

    dataset: str
    num_samples: int
    delta: float
    accountant: str
    clip_norm: float
    target_epsilon: float
    history: list = field(default_factory=list)
    parent: dict | None = None
    pretraining: dict | None = None
    augmult: int | None = None
    manifest: dict | None = None
    recipe_choice: dict | None = None
    statistics: list = field(default_factory=list)

    def __post_init__(self):
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.delta >= 1 / self.num_samples:
            raise ValueError(f"delta={self.delta} is not below 1/N = {1 / self.num_samples:.2e}; such a delta "
                             "allows releasing a whole sample. Use delta < 1/N (e.g. 1e-5 for N=50000)")
        self.history = [list(h) for h in self.history]

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.history)

    @property
    def accounted(self) -> list:
        """Everything spent on this data set, in the accountant's format: the statistics' releases, then
        ``history``."""
        return [[float(e["sigma"]), float(e["sample_rate"]), int(e["releases"])] for e in self.statistics] \
            + self.history

    def epsilon(self) -> float:
        return compute_epsilon(self.accounted, self.delta, self.accountant)

    def record(self, sigma: float, sample_rate: float, steps: int = 1) -> None:
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == sample_rate:
            self.history[-1][2] += steps
        else:
            self.history.append([sigma, sample_rate, steps])

    def steps_left(self, sigma: float, sample_rate: float, wanted: int) -> int:
        """Largest n <= wanted such that n more steps keep epsilon within the target (binary search)."""
        ok = lambda n: compute_epsilon([*self.accounted, (sigma, sample_rate, n)], self.delta,  # noqa: E731
                                       self.accountant) <= self.target_epsilon * (1 + 1e-9)
        if ok(wanted):
            return wanted
        lo, hi = 0, wanted
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    def to_dict(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else [None, None, 0]
        return {**asdict(self), "steps": self.steps, "noise_multiplier": last[0], "sample_rate": last[1],
                "epsilon": self.epsilon(), "neighbouring": NEIGHBOURING}

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        keys = {"dataset", "num_samples", "delta", "accountant", "clip_norm", "target_epsilon", "history", "parent"}
        ledger = cls(**{k: d[k] for k in keys}, pretraining=d.get("pretraining"), augmult=d.get("augmult"),
                     manifest=d.get("manifest"), recipe_choice=d.get("recipe_choice"),
                     statistics=d.get("statistics", []))
        if "epsilon" in d and not math.isclose(ledger.epsilon(), d["epsilon"], rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(f"ledger says epsilon={d['epsilon']} but its history gives {ledger.epsilon()}: "
                             "the ledger was edited")
        return ledger

