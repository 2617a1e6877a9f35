"""Empirical privacy audit of zoo's DP-SGD in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

Method ("Privacy Auditing with One (1) Training Run", arXiv 2305.08846, white-box gradient canaries):
  * m canaries; each is included in the training set independently with probability 1/2 (a seeded draw from
    its own stream, apart from all training randomness). Included canaries are training samples like any
    other: they count in N and are Poisson-sampled at every step, at the rate q = B / (N_real + m/2), which is
    fixed before membership is drawn (public, as the accountant assumes).
  * A canary's per-sample gradient is a Dirac vector: zero except ``magnitude * C`` (> C) at its own parameter
    coordinate (distinct, drawn at random); zoo's clipping leaves C there. They are inserted by wrapping the
    ``PerSampleGradients`` handed to :class:`zoo.dp.step.DPStep`, the very step training calls, so zoo's own
    sampling, clipping, summation, noise, normalisation and update are what is audited
    (``tests/test_audit.py`` checks that without canaries the audit trains exactly what ``zoo.train`` trains); sigma (:func:`zoo.privacy.calibrate_sigma` for the run's q and steps) and the claimed epsilon
    (a :class:`zoo.privacy.Ledger`) are zoo's too. The real samples (a small public CIFAR-10 subset) train
    the model alongside, so their gradients are part of what the auditor must see through.
  * Score of a canary: the sum over steps of the released (noisy) gradient at its coordinate, in units of C per
    expected batch (white-box: the auditor sees every released update). An included canary's expected score
    is q * steps; an excluded one's is what the real samples put there.
  * Guesses: "in" for the k highest scores, "out" for the k lowest, abstain on the rest (r = 2k guesses, v
    correct). Each k of the fixed list ``ks`` is tested at level beta / len(ks) (union bound), so the best
    bound over the list holds at confidence 1 - beta.
  * Bound: :func:`epsilon_lower_bound`, Theorem 5.2 of the paper (approximate DP with abstentions), evaluated as
    the paper's own code does (Appendix D). With probability >= 1 - beta over the canaries' membership and the
    run's randomness, a mechanism that is (eps, delta)-DP with respect to each canary gives a bound <= eps.
One run does not reach the claimed epsilon even when the analysis is tight (m canaries cap the bound, see
:func:`max_bound`, and one run's guesses carry little evidence against Gaussian noise): the audit's use is to
catch a broken mechanism (missing noise or clipping, too small a sigma), which gives a bound far above the
claim, as the noise-free reference (zoo's ``epsilon=inf``: sigma = 0, same clipping) shows.

Results: ``<out>/results.csv`` (one row per run, appended at once; finished runs are skipped) and
``<out>/results.md``. Reproduce:  python eval/audit_privacy.py   (the CPU run in eval/results/audit-cpu)
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import optimize, special
from tqdm.auto import tqdm

from _fixtures import register_fixture_models
from _results import read_rows, record
from zoo.data import get_dataset_info
from zoo.data.tasks import task_of
from zoo.dp.step import DPStep, step_generator
from zoo.training.engine import _with_views, load_split
from zoo.dp.grad_sample import PerSampleGradients
from zoo.io import write_text
from zoo.privacy import Ledger, calibrate_sigma
from zoo.catalog.registry import build, get_card


# ----------------------------------------------------------------------------- the bound
def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (correct guesses <= guesses <= canaries), got m={m}, r={r}, v={v}")


def p_value(m: int, r: int, v: int, epsilon, delta: float):
    """Probability bound on ``>= v`` correct guesses out of ``r`` (non-abstained) guesses about ``m`` canaries
    (each included independently with probability 1/2) when the mechanism is (epsilon, delta)-DP with respect to
    each canary: Steinke, Nasr & Jagielski 2023 (arXiv 2305.08846), main theorem for approximate DP (Thm 5.2),

        P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
        f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u],

    capped at 1 (as the paper's Appendix D code computes it; ``f(v - i) - f(v) = P[v - i <= Binomial < v]``).
    With ``delta = 0`` it is the binomial tail ``f(v)`` (their pure-DP result). ``epsilon`` may be an
    array (one p-value each)."""
    _check_counts(m, r, v)
    eps = np.asarray(epsilon, dtype=np.float64)
    if np.any(eps < 0) or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got epsilon={epsilon}, delta={delta}")
    p = special.expit(eps)[..., None]  # accuracy of epsilon-DP randomized response
    tail = special.bdtrc(v - 1, r, p[..., 0]) if v > 0 else np.ones_like(eps)
    if delta > 0 and v > 0:
        u = np.arange(v - 1, -1, -1)  # v-1, v-2, ..., 0
        log_pmf = (special.gammaln(r + 1) - special.gammaln(u + 1) - special.gammaln(r - u + 1)
                   + special.xlogy(u, p) + special.xlog1py(r - u, -p))
        window = np.cumsum(np.exp(log_pmf), axis=-1)  # P[v - i <= Bin < v], i = 1..v
        tail = tail + 2 * m * delta * np.max(window / np.arange(1, v + 1), axis=-1)
    out = np.minimum(tail, 1.0)
    return float(out) if out.ndim == 0 else out


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05, grid: int = 400) -> float:
    """Empirical lower bound on epsilon at confidence ``1 - beta`` from ``v`` correct out of ``r`` guesses about
    ``m`` canaries (Steinke et al. 2023, Theorem 5.2 via :func:`p_value`): the largest epsilon whose
    (epsilon, delta)-DP hypothesis :func:`p_value` rejects at level ``beta`` (0 when none is rejected).

    Valid whether or not the p-value is monotone in epsilon: a mechanism that is (e, delta)-DP is also
    (e', delta)-DP for every e' >= e, so rejecting any e' rejects every e <= e'. The search: the pure-DP bound
    eps0 (``delta = 0``: the binomial tail, monotone, solved by Brent's method) caps it, since the tail term
    alone is >= beta above eps0; ``delta > 0`` is then searched on a ``grid`` over [0, eps0] and refined by
    bisection (the paper's code bisects, assuming monotonicity).
    """
    _check_counts(m, r, v)
    if not 0 < beta < 1:
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    tail = lambda e: p_value(m, r, v, e, 0.0) - beta  # noqa: E731  (increasing in e; -> 1 - beta as e -> inf)
    if r == 0 or tail(0.0) >= 0:
        return 0.0
    hi = 1.0
    while tail(hi) < 0:
        hi *= 2
    eps0 = optimize.brentq(tail, 0.0, hi, xtol=1e-10)
    if delta == 0:
        return eps0
    points = np.linspace(0.0, eps0, grid + 1)
    ok = np.flatnonzero(p_value(m, r, v, points, delta) < beta)
    if not len(ok):
        return 0.0
    lo, up = points[ok[-1]], points[min(ok[-1] + 1, grid)]
    for _ in range(40):
        mid = (lo + up) / 2
        lo, up = (mid, up) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return float(lo)


def guesses(scores: np.ndarray, members: np.ndarray, k: int, seed: int = 0) -> tuple[int, int]:
    """``(r, v)``: guess "in" for the ``k`` highest scores and "out" for the ``k`` lowest (ties broken by a seeded
    permutation, independent of membership), abstain on the rest; ``v`` counts the correct guesses."""
    m = len(scores)
    if not 0 <= 2 * k <= m:
        raise ValueError(f"k={k} guesses each way need 2k <= m={m} canaries")
    perm = np.random.default_rng(seed).permutation(m)
    order = perm[np.argsort(scores[perm], kind="stable")]
    v = int(members[order[m - k:]].sum() + (~members[order[:k]]).sum())
    return 2 * k, v


def audit(scores, members, ks, delta: float, confidence: float = 0.95) -> dict:
    """The one-run audit of canary ``scores`` (higher: more likely included) against the true ``members``:
    for each k in the fixed list ``ks``, the bound at level ``(1 - confidence) / len(ks)`` (union bound over the
    list); returns the best ``{"epsilon": ..., "k", "r", "v"}`` and ``per_k`` (each k's r, v, bound)."""
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members, dtype=bool)
    if scores.shape != members.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and members {members.shape} must be 1-D of the same length")
    beta = (1 - confidence) / len(ks)
    per_k = []
    for k in ks:
        r, v = guesses(scores, members, int(k))
        per_k.append({"k": int(k), "r": r, "v": v, "epsilon": epsilon_lower_bound(len(scores), r, v, delta, beta)})
    best = max(per_k, key=lambda d: (d["epsilon"], d["v"] / max(d["r"], 1)))
    return {**best, "per_k": per_k, "beta": beta}


def max_bound(m: int, ks, delta: float, confidence: float = 0.95) -> float:
    """The largest bound ``audit`` can return with ``m`` canaries and these ``ks``: every guess correct."""
    return max(epsilon_lower_bound(m, 2 * k, 2 * k, delta, (1 - confidence) / len(ks)) for k in ks)


# ----------------------------------------------------------------------------- the canary run
class DiracCanaryGradients:
    """A :class:`zoo.dp.grad_sample.PerSampleGradients` that adds the Dirac gradients of the canaries in
    ``pending`` to the next call's per-sample gradients (then clears ``pending``). Canary j's gradient is zero
    except ``value`` at flat coordinate ``coords[j]`` of the concatenated parameters. An empty input returns
    no real samples (so a step whose batch holds only canaries still reaches :func:`zoo.dp.step.dp_gradients`)."""

    def __init__(self, psg: PerSampleGradients, coords: torch.Tensor, value: float):
        self.psg, self.params, self.model, self.value = psg, psg.params, psg.model, value
        sizes = [p.numel() for p in self.params.values()]
        starts = torch.tensor([0, *itertools.accumulate(sizes)])
        self.which = torch.searchsorted(starts, coords, right=True) - 1  # parameter of each canary
        self.offset = coords - starts[self.which]                        # its index inside that parameter
        self.pending = torch.empty(0, dtype=torch.long)

    def __call__(self, inputs, targets, loss_fn=None, views: int = 1):
        if len(inputs):
            grads, losses, outputs = self.psg(inputs, targets, loss_fn, views)
        else:
            grads = {n: p.new_zeros((0, *p.shape)) for n, p in self.params.items()}
            losses, outputs = inputs.new_zeros(0), inputs.new_zeros((0, self.model.num_classes))
        ids, self.pending = self.pending, torch.empty(0, dtype=torch.long)
        if len(ids):
            for j, (name, p) in enumerate(self.params.items()):
                rows = p.new_zeros((len(ids), p.numel()))
                mine = (self.which[ids] == j).nonzero().flatten()
                rows[mine, self.offset[ids[mine]]] = self.value
                grads[name] = torch.cat([grads[name], rows.view(len(ids), *p.shape)])
        return grads, losses, outputs

    def released(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every canary's coordinate of a released gradient ``{name: tensor}``."""
        flat = torch.cat([grads[n].detach().flatten() for n in self.params])
        starts = torch.tensor([0, *itertools.accumulate(p.numel() for p in self.params.values())])
        return flat[starts[self.which] + self.offset]


def canary_run(model: str = "test-wrn10-1", *, epsilon: float, canaries: int, steps: int, batch_size: int,
               train_subset: int, seed: int = 0, augmult: int = 1, lr: float | None = None, delta: float | None = None,
               magnitude: float = 2.0, data_dir=None, device: str = "cpu", progress: bool = False) -> dict:
    """One DP-SGD run of registered ``model`` (its card's recipe, with these overrides) on ``train_subset`` public
    CIFAR-10 images (the card's data set) plus the included canaries; sigma calibrated by zoo for ``epsilon``
    (``inf``: sigma = 0, same clipping). Returns the canaries' ``scores`` (summed released gradient at their
    coordinates, in units of C per expected batch), the secret ``members``, ``sigma``, ``q``, ``N``, the
    ledger's claimed ``epsilon_claimed`` and the trained ``model``."""
    register_fixture_models()  # the default model is the test suite's tiny WRN (tests/models)
    card = get_card(model)
    recipe = {**card["recipe"], "augmult": augmult, **({"lr": lr} if lr is not None else {}),
              **({"delta": delta} if delta is not None else {})}
    dev = torch.device(device)
    member_gen = step_generator(seed, 0, "audit/membership", torch.device("cpu"))
    members = torch.rand(canaries, generator=member_gen) < 0.5           # the secret S of the paper
    included = members.nonzero().flatten()
    info = get_dataset_info(recipe["dataset"])
    train = load_split(recipe["dataset"], "train", recipe, data_dir, subset=train_subset)
    n_real = len(train)
    n = n_real + len(included)
    # q is public, fixed before membership is drawn: B over the expected N, so no canary's presence moves it
    q = batch_size / (n_real + canaries / 2)
    if q > 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training samples; use a smaller batch")
    ledger = Ledger(dataset=info.name, num_samples=n, delta=recipe["delta"], accountant=recipe["accountant"],
                    clip_norm=recipe["clip_norm"], target_epsilon=epsilon)
    sigma = 0.0 if math.isinf(epsilon) else calibrate_sigma(epsilon, recipe["delta"], q, steps, recipe["accountant"])
    torch.manual_seed(seed)
    net = build(card, num_classes=info.num_classes, in_chans=info.in_chans).to(dev)
    total = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if canaries > total:
        raise ValueError(f"{canaries} canaries need as many distinct coordinates; {model} has {total}")
    coords = torch.randperm(total, generator=step_generator(seed, 0, "audit/coordinates", torch.device("cpu")))[:canaries]
    c, k = recipe["clip_norm"], recipe["augmult"]
    psg = DiracCanaryGradients(PerSampleGradients(net), coords, magnitude * c)
    opt = torch.optim.SGD(net.parameters(), lr=recipe["lr"], momentum=recipe["momentum"])
    scores = torch.zeros(canaries, dtype=torch.float64)
    empty = (torch.zeros((0, *train.images.shape[1:]), device=dev), torch.zeros(0, dtype=torch.long, device=dev))
    # zoo's own DP-SGD step, the one training calls (sampling, clipping, noise, division, update)
    dp_step = DPStep(psg, opt, n=n, sample_rate=q, sigma=sigma, clip_norm=c, expected_batch=batch_size, views=k,
                     seed=seed, device=dev, score=task_of(net).score)

    def batches_for(idx: torch.Tensor, aug: torch.Generator):
        """The step's real samples as training batches them; its sampled canaries ride along in ``psg``."""
        real = idx[idx < n_real]
        psg.pending = included[idx[idx >= n_real] - n_real]
        return itertools.chain(
            (_with_views(train.batch(chunk), k, aug, dev, info, recipe)
             for chunk in (real.split(recipe["physical_batch_size"]) if len(real) else ())),
            (empty for _ in range(1) if len(psg.pending)))  # canaries only: one empty call carries them

    net.train()
    t0 = time.time()
    for step in tqdm(range(steps), desc=f"audit eps={epsilon:g}", disable=not progress, dynamic_ncols=True):
        _, grads, _, _ = dp_step(step, batches_for)
        scores += psg.released(grads).double().cpu() * (batch_size / c)
        ledger.record(sigma, q)
    psg.psg.close()
    return {"scores": scores.numpy(), "members": members.numpy(), "sigma": sigma, "q": q, "N": n,
            "n_real": n_real, "included": len(included), "delta": recipe["delta"], "steps": ledger.steps,
            "epsilon_claimed": ledger.epsilon(), "time_s": round(time.time() - t0, 1), "model": net}


# ----------------------------------------------------------------------------- the study
FIELDS = ["model", "dataset", "epsilon", "epsilon_claimed", "delta", "sigma", "canaries", "included", "train_subset",
          "N", "batch_size", "q", "steps", "augmult", "seed", "confidence", "ks", "k", "r", "v", "accuracy",
          "epsilon_lower_bound", "max_bound", "mean_score_in", "mean_score_out", "time_s"]
SETTINGS = ["model", "canaries", "train_subset", "batch_size", "steps", "augmult", "seed", "confidence", "ks"]


def _key(row: dict) -> tuple:
    return tuple(str(row[f]) for f in SETTINGS) + (str(float(row["epsilon"])),)


def table(rows: list[dict]) -> str:
    """``results.md``: a short header (method, settings, sigma per epsilon, confidence, the reading) and the table."""
    r0 = rows[0]
    eps = lambda r: "∞ (no noise)" if math.isinf(float(r["epsilon"])) else f"{float(r['epsilon']):g}"  # noqa: E731
    dp = [r for r in rows if not math.isinf(float(r["epsilon"]))]
    free = [r for r in rows if math.isinf(float(r["epsilon"]))]
    below = all(float(r["epsilon_lower_bound"]) <= float(r["epsilon_claimed"]) for r in dp)
    reading = (f"with DP every empirical bound stays below its claim ({'yes' if below else 'NO: a violation'}, "
               f"largest {max((float(r['epsilon_lower_bound']) for r in dp), default=0):.2f}); " if dp else "")
    if free:
        reading += (f"without noise the bound rises to {float(free[0]['epsilon_lower_bound']):.2f} (the most "
                    f"{r0['canaries']} canaries allow with these k: {float(free[0]['max_bound']):.2f}). ")
    reading += ("One run with m canaries cannot show the claim is tight (the bound is capped by m and k): the audit "
                "catches a broken mechanism (missing noise or clipping, too small a sigma), it does not measure "
                "how loose the accountant is.")
    lines = ["### Empirical privacy audit: one-run, white-box Dirac gradient canaries", "",
             f"Method: Steinke, Nasr & Jagielski 2023 (one training run, Theorem 5.2 with abstentions), "
             f"`eval/audit_privacy.py`. `{r0['model']}` on {r0['train_subset']} CIFAR-10 images plus the included "
             f"canaries of m = {r0['canaries']} (each in with probability 1/2; a canary's gradient is C at its own "
             f"coordinate, through zoo's clipping and noise); B = {r0['batch_size']}, {r0['steps']} steps, "
             f"K = {r0['augmult']}, δ = {float(r0['delta']):g}, seed {r0['seed']}. Score: summed released gradient at "
             f"the canary's coordinate; guesses: k highest in, k lowest out, k ∈ {{{r0['ks']}}} with a union bound; "
             f"confidence {float(r0['confidence']):g}.", "",
             f"Reading: {reading}", "",
             "| claimed ε (ledger) | σ | q | N | k | guesses r | correct v | accuracy | mean score in / out "
             "| empirical ε lower bound | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: float(r["epsilon"])):
        lines.append(f"| {eps(r)} | {float(r['sigma']):.3f} | {float(r['q']):.4f} | {r['N']} | {r['k']} | {r['r']} | "
                     f"{r['v']} | {float(r['accuracy']):.3f} | {float(r['mean_score_in']):.2f} / "
                     f"{float(r['mean_score_out']):.2f} | **{float(r['epsilon_lower_bound']):.3f}** | "
                     f"{float(r['time_s']):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="test-wrn10-1")
    ap.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 1.0, 2.0, 4.0, 8.0],
                    help="target epsilons; inf is the noise-free reference (sigma = 0, same clipping)")
    ap.add_argument("--canaries", type=int, default=1000, help="m: canaries, each included with probability 1/2")
    ap.add_argument("--ks", type=int, nargs="+", help="guesses each way (default m/20 m/10 m/5 3m/10)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64, help="expected (Poisson) batch size B; q = B/N")
    ap.add_argument("--train-subset", type=int, default=100, help="real CIFAR-10 training images")
    ap.add_argument("--augmult", type=int, default=1)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "audit-cpu"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    ks = args.ks or [args.canaries // 20, args.canaries // 10, args.canaries // 5, 3 * args.canaries // 10]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    settings = {"model": args.model, "canaries": args.canaries, "train_subset": args.train_subset,
                "batch_size": args.batch_size, "steps": args.steps, "augmult": args.augmult, "seed": args.seed,
                "confidence": args.confidence, "ks": " ".join(map(str, ks))}
    done = {_key(r) for r in rows}
    redraw = lambda rs: write_text(out / "results.md", table(rs))  # noqa: E731
    for i, eps in enumerate(args.epsilons, 1):
        if _key({**settings, "epsilon": eps}) in done:
            print(f"[{i}/{len(args.epsilons)}] epsilon {eps:g}: done, skipped", file=sys.stderr, flush=True)
            continue
        print(f"[{i}/{len(args.epsilons)}] epsilon {eps:g}: {args.steps} steps ...", file=sys.stderr, flush=True)
        run = canary_run(args.model, epsilon=eps, canaries=args.canaries, steps=args.steps,
                         batch_size=args.batch_size, train_subset=args.train_subset, seed=args.seed,
                         augmult=args.augmult, data_dir=args.data_dir, device=args.device, progress=True)
        res = audit(run["scores"], run["members"], ks, run["delta"], args.confidence)
        mem = run["members"]
        row = {**settings, "dataset": get_card(args.model)["recipe"]["dataset"], "epsilon": eps,
               "epsilon_claimed": run["epsilon_claimed"], "delta": run["delta"], "sigma": run["sigma"],
               "included": run["included"], "N": run["N"], "q": run["q"], "steps": run["steps"],
               "k": res["k"], "r": res["r"], "v": res["v"], "accuracy": res["v"] / res["r"],
               "epsilon_lower_bound": res["epsilon"], "max_bound": max_bound(args.canaries, ks, run["delta"],
                                                                             args.confidence),
               "mean_score_in": float(run["scores"][mem].mean()), "mean_score_out": float(run["scores"][~mem].mean()),
               "time_s": run["time_s"]}
        record(rows, row, csv_path, FIELDS, redraw,
               summary=f"    sigma {run['sigma']:.3f}, claimed epsilon {run['epsilon_claimed']:.3f}: {res['v']}/"
                       f"{res['r']} correct (k={res['k']}), empirical lower bound {res['epsilon']:.3f} "
                       f"({run['time_s']} s)")
    if rows:
        redraw(rows)
    print(f"{len(rows)} rows in {csv_path}; table {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
