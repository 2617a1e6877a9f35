"""Study: private CIFAR-10 on 2 CPU cores, recipes chosen with TAN's small-batch simulation (Sander et al. 2023);
the same procedure for the ScatterNet models of PneumoniaMNIST (config ``pneumonia-scatternet``).

For each candidate full recipe ``(model, B, S)`` at a target epsilon (CIFAR-10: 8, delta 1e-5, RDP, N = 50,000),
sigma is calibrated by the accountant, and the recipe is *simulated* at a smaller batch ``b``: the same steps ``S`` and the same ``sigma /
B`` (``zoo.dp.tan.scale_down``), so it costs ``b / B`` of the full run. TAN show that test accuracy follows ``sigma /
B`` at fixed ``S`` while the simulated sigma stays above about 0.5, so the ranking of the simulated runs predicts
the full runs'; ``b`` is the smallest that keeps it there. A simulated run is **not private at epsilon 8**: it
spends the far larger epsilon recorded in its row (column ``epsilon_spent``) and is only used to choose learning
rate, steps and model. The chosen recipe is then run at full privacy (stage ``full``, 3 public seeds: a measurement
of its spread), and the release is trained once more with a secret seed (``eval/release_cpu.py``).

Each run appends one row to ``<out>/results.csv``; ``results.md`` and ``accuracy_vs_lr.png`` are redrawn after
each. Resumable: finished rows are skipped, an interrupted run resumes from its step checkpoint.

Configurations (budgets in samples processed; times are for an idle 2-core x86_64 CPU):
  release  ``scatternet-linear`` (ScatterNet + linear): search over lr and the split of a 491,520-sample budget
           into B and S, seed 0; full runs of the best simulated recipe, seeds 0, 1, 2. ``scatternet-cnn``
           (ScatterNet + CNN, 3x the cost per sample here): one simulated point at the same recipe. ``CONFIGS``
           gives the exact points.
           The end-to-end models are not searched here: at the budgets this CPU allows (wrn16-1: B=1024, S=400,
           409,600 samples, about 40 minutes) their full sigma is below 1 (0.67), so no smaller batch keeps the
           simulated sigma above 0.5, and a search would be a grid of full runs.
  release-long  CIFAR-10 at epsilon 8 with six times the epochs (Tramèr & Boneh's ScatterNet + CNN trained 60):
           ``scatternet-cnn`` at B=4096, S=360 (about 30 epochs, 1,474,560 samples; sigma 1.26, within 16 % of the
           sigma / B of their B=8192 at half the compute), lr 4 (theirs, at B=8192 for this model), simulated at
           b=2048 (737,280 samples, about 40 minutes here); full runs, public seeds 0, 1 (about 80 minutes each).
           Variants of the same point (a model entry whose ``model`` names the registered model it trains):
           ``scatternet-cnn+ema0.99``, an EMA of the weights (decay 0.99; the release uses none); and the model
           ``scatternet-cnn-datanorm``: the paper's private data normalisation instead of GroupNorm(27) (its
           six releases of the statistics, sigma 8, composed into every epsilon: DP-SGD's sigma 1.274, not 1.258),
           also with the EMA (``scatternet-cnn-datanorm+ema0.99``). Simulated: GroupNorm 0.6854, data
           normalisation 0.6959, with the EMA 0.6927 (seed 0). Data normalisation also at twice the budget,
           Tramèr & Boneh's B=8192, S=360 (2,949,120 samples, sigma 2.195, sigma / B 14 % lower): simulated 0.6968
           (b=2048), a tenth of a point for twice the compute; there also lr 8, and a cosine decay of the lr
           (``scatternet-cnn-datanorm+cosine``, lr 4 and 8). Full runs: both models without the EMA.
           Results in ``eval/results/cifar10-release-long/``.
  release-long-eps3  CIFAR-10 at epsilon 3 for ``scatternet-cnn-datanorm`` at Tramèr & Boneh's B=8192, S=360
           (2,949,120 samples, about 60 epochs; their 69.3 % at this epsilon), the statistics' sigma 8 (the card's)
           against 16 (``+nsigma16``: they cost epsilon 0.60 instead of 1.26, DP-SGD's sigma 4.902 instead of
           5.352); simulated at b=1024 (368,640 samples): lr 4 best for both, sigma 16 0.6805 against sigma 8
           0.6789 (one seed: within the simulation's noise). Full runs so far: sigma 8, public seeds 0-2, 0.6854 +/-
           0.0034 (``--stage full --models scatternet-cnn-datanorm``; the sigma-16 variant's would be 3 more runs of
           about 45 idle minutes). Results in ``eval/results/cifar10-release-long-eps3/``.
  release-e2e  The seed spread of the end-to-end releases ``wrn16-1.dp_eps8`` (B=1024, S=400, lr 2: 409,600
           samples) and ``eq-resnet9-c4.dp_eps8`` (B=512, S=280, lr 2: 143,360 samples, the same idle CPU time at its
           measured throughput): their recipes exactly, not searched (a model entry with ``search`` False runs its
           one given point), full runs of public seeds 0, 1, 2 (about 40 and 28 idle minutes each).
           Results in ``eval/results/cifar10-release-e2e/``.
  tan-propose, tan-propose-pneumonia  TAN without model knowledge: the recipe that ``zoo.dp.tan.propose(epsilon,
           delta, N)`` gives alone (its default S = 2500 and sigma 3; B from epsilon, delta and N), at the lr of the
           best recipe that the search of ``release-long`` (CIFAR-10, ``scatternet-cnn-datanorm``, epsilon 8) and
           ``pneumonia-scatternet`` (both ScatterNets, epsilon 8, 3, 1) found, so that only the privacy parameters
           differ; full privacy, the table beside the searched recipe's full-privacy seeds. CIFAR-10: B=4346,
           10,865,000 samples (one seed, about 2.7 idle hours; 3.7 times the searched recipe's compute);
           PneumoniaMNIST: B=445 / 184 / 64 at epsilon 8 / 3 / 1, 1.1 M / 0.46 M / 0.16 M samples, seeds 0-2.
  pneumonia-scatternet  PneumoniaMNIST (N = 4,708, delta 1e-4 < 1/N) at epsilon 8, 3 and 1: ScatterNet + linear
           and ScatterNet + CNN on the 1x28x28 X-rays (``scatternet-linear-pneumonia``, ``scatternet-cnn-pneumonia``),
           Tramèr & Boneh's settings; search over lr and two splits of the budget, ranked by balanced accuracy (the
           test split is imbalanced); full runs of the best, seeds 0, 1, 2. Every run is a few tens of seconds.
           Results in ``eval/results/pneumoniamnist-pneumonia-scatternet/``.
Hyper-parameters are chosen on the test split, as in TAN and Tramèr & Boneh (the engine holds no validation split);
the full-privacy seed spread is the honest error bar, and the choice itself is not private.
Reproduce:  python eval/study_cifar10.py --config CONFIG (one of the above)
            [--stage search|full]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import zoo
from _results import LABELS, METRICS, close, mean_std, read_rows, record, report, study_dirs, study_parser
from zoo.dp.data_norm import releases, statistics_history
from zoo.nn.layers import MEMO_BYTES, memoized_fixed_layers
from zoo.privacy import calibrate_sigma, compute_epsilon
from zoo.catalog.registry import get_card
from zoo.dp.tan import propose, scale_down

_SCATTER = {"physical_batch_size": 256, "clip_norm": 0.1, "momentum": 0.9, "augmult": 1, "ema_decay": 0.0}
_E2E = {"physical_batch_size": 64, "clip_norm": 1.0, "momentum": 0.0, "augmult": 1, "ema_decay": 0.999}
CONFIGS = {
    "release": {
        "dataset": "cifar10", "n": 50_000, "delta": 1e-5, "epsilons": [8.0], "metric": "accuracy",
        "search_seeds": [0], "full_seeds": [0, 1, 2],
        # TAN's simulation holds while the simulated sigma stays above about 0.5: the batch shrinks by the largest
        # factor (at most max_shrink) that keeps it there, so at epsilon 8, where the full sigma is 1-2, a
        # simulation costs a half to a third of the full run rather than an eighth
        "min_sim_sigma": 0.5, "max_shrink": 8,
        # model -> fixed recipe settings, and the (B, S, lr) points of the search
        "models": {
            # Tramèr & Boneh's settings (momentum 0.9, clip 0.1, no augmentation); lr at their B=8192 over a budget
            # of B x S = 491,520 samples (about 10 epochs), and one other split of that budget
            "scatternet-linear": {"fixed": {"physical_batch_size": 256, "clip_norm": 0.1, "momentum": 0.9,
                                            "augmult": 1, "ema_decay": 0.0},
                                  "points": [(8192, 60, lr) for lr in (2.0, 4.0, 8.0, 16.0)] + [(16384, 30, 4.0)],
                                  "full": True},
            # the CNN head costs 3x the linear one per sample on this CPU: one simulated point at the same recipe
            "scatternet-cnn": {"fixed": {"physical_batch_size": 256, "clip_norm": 0.1, "momentum": 0.9,
                                         "augmult": 1, "ema_decay": 0.0},
                               "points": [(8192, 60, 4.0)], "full": False},
        },
    },
    "release-long": {
        "dataset": "cifar10", "n": 50_000, "delta": 1e-5, "epsilons": [8.0], "metric": "accuracy",
        "search_seeds": [0], "full_seeds": [0, 1, 2], "min_sim_sigma": 0.5, "max_shrink": 8,
        "models": {"scatternet-cnn": {"fixed": _SCATTER, "full": True, "points": [(4096, 360, 4.0)]},
                   # the same recipe with an EMA of the weights (De et al.; the release above uses none)
                   "scatternet-cnn+ema0.99": {"model": "scatternet-cnn", "fixed": {**_SCATTER, "ema_decay": 0.99},
                                              "full": False, "points": [(4096, 360, 4.0)]},
                   # Tramèr & Boneh's normalisation for CIFAR-10: private data statistics instead of GroupNorm(27)
                   # and at twice the budget: Tramèr & Boneh's own B=8192 over their 60 epochs (S=360)
                   "scatternet-cnn-datanorm": {"fixed": _SCATTER, "full": True,
                                               "points": [(4096, 360, 4.0), (8192, 360, 4.0), (8192, 360, 8.0)]},
                   # with a cosine decay of the lr to 0 over the steps (zoo.schedule), at the larger budget
                   "scatternet-cnn-datanorm+cosine": {"model": "scatternet-cnn-datanorm", "full": False,
                                                      "fixed": {**_SCATTER, "lr_schedule": "cosine"},
                                                      "points": [(8192, 360, 4.0), (8192, 360, 8.0)]},
                   "scatternet-cnn-datanorm+ema0.99": {"model": "scatternet-cnn-datanorm", "full": False,
                                                       "fixed": {**_SCATTER, "ema_decay": 0.99},
                                                       "points": [(4096, 360, 4.0)]}},
    },
    # epsilon 3, Tramèr & Boneh's own budget (their 69.3 %): B=8192, S=360 (about 60 epochs). The statistics cost a
    # larger share of a smaller budget, so their sigma is also simulated at 16 (6 releases: epsilon 0.60 alone,
    # DP-SGD's sigma 4.902) against the card's 8 (epsilon 1.26 alone, DP-SGD's sigma 5.352)
    "release-long-eps3": {
        "dataset": "cifar10", "n": 50_000, "delta": 1e-5, "epsilons": [3.0], "metric": "accuracy",
        "search_seeds": [0], "full_seeds": [0, 1, 2], "min_sim_sigma": 0.5, "max_shrink": 8,
        "models": {"scatternet-cnn-datanorm": {"fixed": _SCATTER, "full": True,
                                               "points": [(8192, 360, 4.0), (8192, 360, 8.0)]},
                   "scatternet-cnn-datanorm+nsigma16": {"model": "scatternet-cnn-datanorm", "full": True,
                                                        "fixed": {**_SCATTER, "norm_sigma": 16.0},
                                                        "points": [(8192, 360, 4.0), (8192, 360, 8.0)]}},
    },
    "release-e2e": {
        "dataset": "cifar10", "n": 50_000, "delta": 1e-5, "epsilons": [8.0], "metric": "accuracy",
        "search_seeds": [], "full_seeds": [0, 1, 2], "min_sim_sigma": 0.5, "max_shrink": 8,
        # the end-to-end releases' recipes exactly (eval/release_cpu.py CIFAR and EQ_CIFAR), not searched: their full
        # sigma is below 1, so no TAN simulation keeps sigma above 0.5 (the release config's docstring)
        "models": {"eq-resnet9-c4": {"fixed": _E2E, "full": True, "search": False, "points": [(512, 280, 2.0)]},
                   "wrn16-1": {"fixed": _E2E, "full": True, "search": False, "points": [(1024, 400, 2.0)]}},
    },
    # TAN without model knowledge (issue 18): B, S from zoo.dp.tan.propose(epsilon, delta, N) alone, the lr of the
    # best recipe that the search of the config named by "propose" found for the same model and epsilon
    "tan-propose": {
        "dataset": "cifar10", "n": 50_000, "delta": 1e-5, "epsilons": [8.0], "metric": "accuracy",
        "search_seeds": [], "full_seeds": [0], "min_sim_sigma": 0.5, "max_shrink": 8,
        "models": {"scatternet-cnn-datanorm": {"fixed": _SCATTER, "full": True, "search": False,
                                               "propose": "release-long"}},
    },
    "tan-propose-pneumonia": {
        "dataset": "pneumoniamnist", "n": 4_708, "delta": 1e-4, "epsilons": [8.0, 3.0, 1.0],
        "metric": "balanced_accuracy", "search_seeds": [], "full_seeds": [0, 1, 2], "min_sim_sigma": 0.5,
        "max_shrink": 8,
        "models": {m: {"fixed": _SCATTER, "full": True, "search": False, "propose": "pneumonia-scatternet"}
                   for m in ("scatternet-linear-pneumonia", "scatternet-cnn-pneumonia")},
    },
    "pneumonia-scatternet": {
        "dataset": "pneumoniamnist", "n": 4_708, "delta": 1e-4, "epsilons": [8.0, 3.0, 1.0],
        "metric": "balanced_accuracy", "search_seeds": [0], "full_seeds": [0, 1, 2], "min_sim_sigma": 0.5,
        "max_shrink": 8,
        "models": {
            "scatternet-linear-pneumonia": {
                "fixed": _SCATTER, "full": True,
                "points": [(1024, 200, lr) for lr in (2.0, 4.0, 8.0, 16.0)] + [(2048, 100, lr) for lr in (4.0, 16.0)]},
            "scatternet-cnn-pneumonia": {
                "fixed": _SCATTER, "full": True, "points": [(1024, 200, lr) for lr in (1.0, 2.0, 4.0, 8.0)]},
        },
    },
}
PLOT = "accuracy_vs_lr.png"
FIELDS = ["config", "stage", "model", "full_batch_size", "batch_size", "steps", "lr", "sigma", "sigma_over_B",
          "epsilon_target", "epsilon_spent", "seed", "accuracy", "samples", "train_time_s", "samples_per_s"]


def fields(cfg: dict) -> list[str]:
    """The CSV columns: ``FIELDS``, with balanced accuracy and ROC-AUC after accuracy where the config ranks by
    one of them."""
    i = FIELDS.index("accuracy")
    return FIELDS if cfg["metric"] == "accuracy" else [*FIELDS[:i], *METRICS, *FIELDS[i + 1:]]


def released_before(model: str, spec: dict) -> list:
    """What a run of the entry releases before DP-SGD, in the accountant's format: the private normalisation
    statistics of each ``DataStandardize`` layer of the model (``zoo.dp.data_norm``) at the recipe's norm_sigma."""
    name = spec.get("model", model)
    sigma = {**get_card(name)["recipe"], **spec["fixed"]}.get("norm_sigma")
    count = releases(zoo.create_model(name))
    return statistics_history(sigma, count) if count else []


def full_sigma(batch: int, steps: int, cfg: dict, eps: float, before: list = ()) -> float:
    return calibrate_sigma(eps, cfg["delta"], batch / cfg["n"], steps, "rdp", history=before)


def shrink_for(sigma: float, cfg: dict) -> int:
    """The largest batch reduction (at most ``max_shrink``) that keeps the simulated sigma above ``min_sim_sigma``."""
    return max(1, min(cfg["max_shrink"], int(sigma / cfg["min_sim_sigma"])))


def key(config, stage, model, batch, steps, lr, seed, run_batch, eps=None) -> str:
    """The run's name; with the target epsilon at the end where the config has several."""
    return (f"{config}-{stage}-{model}-B{batch}-b{run_batch}-S{steps}-lr{lr:g}-seed{seed}"
            + (f"-eps{eps:g}" if eps is not None else ""))


def eps_key(cfg: dict, eps: float):
    return eps if len(cfg["epsilons"]) > 1 else None


def run_point(model: str, spec: dict, batch: int, steps: int, lr: float, seed: int, stage: str, cfg: dict,
              runs: Path, config: str, data_dir, device, target: float) -> dict:
    before = released_before(model, spec)
    sigma = full_sigma(batch, steps, cfg, target, before)
    b, eps, n = batch, target, cfg["n"]
    if stage == "search":  # TAN: same S and sigma / B at a smaller batch (the statistics' release unchanged)
        sim = scale_down(batch, sigma, steps, batch // shrink_for(sigma, cfg))
        b = sim["batch_size"]
        eps = compute_epsilon([*before, (sim["sigma"], b / n, steps)], cfg["delta"], "rdp")  # what it spends
    t0 = time.time()
    out_dir = runs / key(config, stage, model, batch, steps, lr, seed, b, eps_key(cfg, target))
    result = zoo.train(spec.get("model", model), dataset=cfg["dataset"], epsilon=eps, delta=cfg["delta"],
                       batch_size=b, steps=steps, lr=lr, seed=seed, data_dir=data_dir, out_dir=out_dir, resume=True,
                       progress=False, device=device, **spec["fixed"])
    ledger = result["ledger"]
    seen = result["training"]["samples_processed"]
    return {"config": config, "stage": stage, "model": model, "full_batch_size": batch, "batch_size": b,
            "steps": ledger["steps"], "lr": lr, "sigma": round(ledger["noise_multiplier"], 4),
            "sigma_over_B": f"{ledger['noise_multiplier'] / b:.3e}", "epsilon_target": target,
            "epsilon_spent": round(ledger["epsilon"], 3), "seed": seed,
            **{m: result["test"][m] for m in fields(cfg) if m in METRICS},
            "samples": seen, "train_time_s": round(time.time() - t0, 1),
            "samples_per_s": round(seen / max(result["training"]["wall_time_s"], 1e-9), 1)}


def searched(config: str) -> list[dict]:
    """The rows of study ``config`` (its default results folder)."""
    return read_rows(study_dirs(CONFIGS[config]["dataset"], config, None, None)[2])


def proposed_point(model: str, spec: dict, cfg: dict, eps: float) -> tuple[int, int, float]:
    """TAN without model knowledge: ``(B, S)`` from :func:`zoo.dp.tan.propose` (epsilon, delta, N) alone, its
    default S and sigma; the lr of the best recipe that the search of study ``spec["propose"]`` found for the same
    model and epsilon, so that only the privacy parameters differ from it."""
    ref = spec["propose"]
    best = best_points(searched(ref), ref, CONFIGS[ref]["metric"])
    if (model, eps) not in best:
        raise SystemExit(f"study {ref} has no search of {model} at epsilon {eps:g} to take the lr from; run "
                         f"`python eval/study_cifar10.py --config {ref} --stage search` first")
    p = propose(eps, cfg["delta"], cfg["n"])
    return p["batch_size"], p["steps"], best[model, eps][2]


def run_batch(stage: str, batch: int, steps: int, cfg: dict, eps: float, before: list = ()) -> int:
    return batch // shrink_for(full_sigma(batch, steps, cfg, eps, before), cfg) if stage == "search" else batch


def best_points(rows: list[dict], config: str, metric: str = "accuracy") -> dict:
    """(model, target epsilon) -> the (B, S, lr) of its best simulated run (mean ``metric`` over the search
    seeds)."""
    acc: dict = {}
    for r in rows:
        if r["stage"] == "search" and r["config"] == config:
            acc.setdefault((r["model"], float(r["epsilon_target"]), int(r["full_batch_size"]), int(r["steps"]),
                            float(r["lr"])), []).append(float(r[metric]))
    best: dict = {}
    for (model, eps, b, s, lr), vals in acc.items():
        m = statistics.fmean(vals)
        if (model, eps) not in best or m > best[model, eps][1]:
            best[model, eps] = ((b, s, lr), m)
    return {k: point for k, (point, _) in best.items()}


NAMES = {"cifar10": "CIFAR-10", "pneumoniamnist": "PneumoniaMNIST"}


def plot(rows: list[dict], path: Path) -> None:
    """The search's ranking metric against lr: one panel per target epsilon, one line per (model, B, S)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = CONFIGS[rows[0]["config"]]
    metric = cfg["metric"]
    search = [r for r in rows if r["stage"] == "search"]
    epsilons = cfg["epsilons"]
    fig, axes = plt.subplots(1, len(epsilons), figsize=(6 * len(epsilons), 4.2), squeeze=False)
    for ax, eps in zip(axes[0], epsilons):
        here = [r for r in search if float(r["epsilon_target"]) == eps]
        for model in sorted({r["model"] for r in here}):
            for bf, steps in sorted({(int(r["full_batch_size"]), int(r["steps"])) for r in here
                                     if r["model"] == model}):
                pts = sorted((float(r["lr"]), float(r[metric])) for r in here if r["model"] == model
                             and int(r["steps"]) == steps and int(r["full_batch_size"]) == bf)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model}, B={bf}, S={steps}")
        ax.set_xscale("log")
        ax.set(title=f"{NAMES[cfg['dataset']]}, TAN simulations of epsilon {eps:g} recipes", xlabel="learning rate",
               ylabel=f"test {LABELS[metric]}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:  # every recipe of the config is given, not searched
            ax.text(0.5, 0.5, "no search: the recipes are given (see results.md)", ha="center",
                    transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], config: str) -> str:
    cfg = CONFIGS[config]
    metrics = [m for m in fields(cfg) if m in METRICS]
    eps = ", ".join(f"{e:g}" for e in cfg["epsilons"])
    lines = [f"### Private {NAMES[cfg['dataset']]} on the CPU: `{config}` configuration", "",
             f"From `eval/study_cifar10.py --config {config}` (ε = {eps}, δ = {cfg['delta']:g}, RDP, "
             f"N = {cfg['n']:,}). `search` rows are TAN simulations at a smaller batch (B run) with the full run's "
             "steps and σ/B, simulated σ kept ≥ 0.5: they choose the recipe (by test "
             f"{LABELS[cfg['metric']]}) and are **not** private at the target ε (ε spent is given). `full` rows are "
             "the chosen recipe at full privacy, public seeds (measurements, not releases). Samples are training "
             "samples through the per-sample gradient; samples/s is for the whole run on 2 CPU cores (x86_64).", "",
             "| stage | model | ε target | B (full) | B run | S | lr | σ | ε spent | seeds | "
             + " | ".join(f"test {LABELS[m]}" for m in metrics) + " | samples | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(metrics) + "---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["stage"], r["model"], -float(r["epsilon_target"]), int(r["full_batch_size"]),
                           int(r["batch_size"]), int(r["steps"]), float(r["lr"])), []).append(r)
    for (stage, model, neg_eps, bf, b, s, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "search",
                                                                                           kv[0])):
        cells = [mean_std(r[m] for r in rs) for m in metrics]
        lines.append(f"| {stage} | `{model}` | {-neg_eps:g} | {bf} | {b} | {s} | {lr:g} | {float(rs[0]['sigma']):.3f} "
                     f"| {float(rs[0]['epsilon_spent']):.2f} | {len(rs)} | " + " | ".join(cells)
                     + f" | {int(float(rs[0]['samples'])):,} | "
                     f"{statistics.fmean(float(r['samples_per_s']) for r in rs):.0f} |")
    lines += against_search(rows, cfg, metrics)
    return "\n".join(lines) + "\n"


def against_search(rows: list[dict], cfg: dict, metrics: list[str]) -> list[str]:
    """For the models of a ``propose`` config: zoo.dp.tan.propose's recipe beside the best recipe that the search
    found (the full-privacy rows of that study), both at full privacy, same model, epsilon and lr."""
    specs = {m: spec for m, spec in cfg["models"].items() if "propose" in spec}
    if not specs:
        return []
    lines = ["", "**zoo.dp.tan.propose alone against the searched recipe** (both at full privacy; same model, ε and "
             "lr; propose knows only ε, δ and N, and uses its default S and σ)", "",
             "| model | ε | recipe | B | S | samples | seeds | " + " | ".join(f"test {LABELS[m]}" for m in metrics)
             + " |", "|---|---|---|---|---|---|---|" + "---|" * len(metrics)]
    for model, spec in specs.items():
        ref = searched(spec["propose"])
        for eps in cfg["epsilons"]:
            for label, rs in (("propose", [r for r in rows if r["stage"] == "full" and r["model"] == model
                                            and float(r["epsilon_target"]) == eps]),
                              (f"searched (`--config {spec['propose']}`)",
                               [r for r in ref if r["stage"] == "full" and r["model"] == model
                                and float(r["epsilon_target"]) == eps])):
                if rs:
                    lines.append(f"| `{model}` | {eps:g} | {label} | {rs[0]['full_batch_size']} | {rs[0]['steps']} | "
                                 f"{int(float(rs[0]['samples'])):,} | {len(rs)} | "
                                 + " | ".join(mean_std(r[m] for r in rs) for m in metrics) + " |")
    return lines


def main() -> int:
    ap = study_parser(__doc__, "<dataset>", CONFIGS)
    ap.set_defaults(config="release")
    ap.add_argument("--stage", choices=["search", "full", "both"], default="both")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--epsilons", nargs="+", type=float, help="a subset of the config's target epsilons")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    models = args.models or list(cfg["models"])
    epsilons = args.epsilons or cfg["epsilons"]
    out, runs, csv_path, rows = study_dirs(cfg["dataset"], args.config, args.out, args.runs)
    redraw = lambda rs: report(rs, out, args.config, plot, table, PLOT)  # noqa: E731
    done = {key(r["config"], r["stage"], r["model"], int(r["full_batch_size"]), int(r["steps"]), float(r["lr"]),
                int(r["seed"]), int(r["batch_size"]), eps_key(cfg, float(r["epsilon_target"]))) for r in rows}

    def go(stage, model, point, seed, eps):
        b, s, lr = point
        if args.steps:
            s = args.steps
        before = released_before(model, cfg["models"][model])
        k = key(args.config, stage, model, b, s, lr, seed, run_batch(stage, b, s, cfg, eps, before),
                eps_key(cfg, eps))
        if k in done:
            return
        print(f"{k} ...", file=sys.stderr, flush=True)
        row = run_point(model, cfg["models"][model], b, s, lr, seed, stage, cfg, runs, args.config,
                        args.data_dir, args.device, eps)
        record(rows, row, csv_path, fields(cfg), redraw,
               summary="    " + ", ".join(f"{m} {row[m]:.4f}" for m in fields(cfg) if m in METRICS)
                       + f", epsilon {row['epsilon_spent']}, {row['samples_per_s']} samples/s, "
                         f"{row['train_time_s']} s")

    with memoized_fixed_layers(MEMO_BYTES):  # the ScatterNet runs share one scattering of each image (zoo.nn.layers)
        if args.stage in ("search", "both"):
            for eps in epsilons:
                for model in models:
                    for point in cfg["models"][model]["points"] if cfg["models"][model].get("search", True) else []:
                        for seed in cfg["search_seeds"]:
                            go("search", model, point, seed, eps)
        if args.stage in ("full", "both"):
            chosen = best_points(rows, args.config, cfg["metric"])
            chosen.update({(m, eps): proposed_point(m, spec, cfg, eps) if "propose" in spec else spec["points"][0]
                           for m, spec in cfg["models"].items() if not spec.get("search", True)  # not searched
                           for eps in epsilons})
            for eps in epsilons:
                for model in models:
                    if (model, eps) in chosen and cfg["models"][model]["full"]:
                        spec = cfg["models"][model]
                        what = ("the best simulated" if spec.get("search", True) else
                                "zoo.dp.tan.propose's" if "propose" in spec else "its given")
                        print(f"{model}, epsilon {eps:g}: full runs of {what} recipe B, S, lr = "
                              f"{chosen[model, eps]}", file=sys.stderr)
                        for seed in cfg["full_seeds"]:
                            go("full", model, chosen[model, eps], seed, eps)
    return close(rows, csv_path, out / PLOT, redraw)


if __name__ == "__main__":
    sys.exit(main())
