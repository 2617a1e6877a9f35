"""Study: private CIFAR-10 on 2 CPU cores, recipes chosen with TAN's small-batch simulation (Sander et al. 2023).

For each candidate full recipe ``(model, B, S)`` at epsilon 8 (delta 1e-5, RDP, N = 50,000), sigma is calibrated by
the accountant, and the recipe is *simulated* at a smaller batch ``b``: the same steps ``S`` and the same ``sigma /
B`` (``zoo.tan.scale_down``), so it costs ``b / B`` of the full run. TAN show that test accuracy follows ``sigma /
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
Reproduce:  python eval/study_cifar10.py --config release [--stage search|full]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import zoo
from _results import close, record, report, study_dirs, study_parser
from zoo.layers import MEMO_BYTES, memoized_fixed_layers
from zoo.privacy import calibrate_sigma, compute_epsilon
from zoo.tan import scale_down

N, EPSILON, DELTA = 50_000, 8.0, 1e-5
CONFIGS = {
    "release": {
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
}
PLOT = "accuracy_vs_lr.png"
FIELDS = ["config", "stage", "model", "full_batch_size", "batch_size", "steps", "lr", "sigma", "sigma_over_B",
          "epsilon_target", "epsilon_spent", "seed", "accuracy", "samples", "train_time_s", "samples_per_s"]


def full_sigma(batch: int, steps: int) -> float:
    return calibrate_sigma(EPSILON, DELTA, batch / N, steps, "rdp")


def shrink_for(sigma: float, cfg: dict) -> int:
    """The largest batch reduction (at most ``max_shrink``) that keeps the simulated sigma above ``min_sim_sigma``."""
    return max(1, min(cfg["max_shrink"], int(sigma / cfg["min_sim_sigma"])))


def key(config, stage, model, batch, steps, lr, seed, run_batch) -> str:
    return f"{config}-{stage}-{model}-B{batch}-b{run_batch}-S{steps}-lr{lr:g}-seed{seed}"


def run_point(model: str, fixed: dict, batch: int, steps: int, lr: float, seed: int, stage: str, cfg: dict,
              runs: Path, config: str, data_dir, device) -> dict:
    sigma = full_sigma(batch, steps)
    b, eps = batch, EPSILON
    if stage == "search":  # TAN: same S and sigma / B at a smaller batch
        sim = scale_down(batch, sigma, steps, batch // shrink_for(sigma, cfg))
        b = sim["batch_size"]
        eps = compute_epsilon([(sim["sigma"], b / N, steps)], DELTA, "rdp")  # what the simulation really spends
    t0 = time.time()
    result = zoo.train(model, epsilon=eps, delta=DELTA, batch_size=b, steps=steps, lr=lr, seed=seed,
                       data_dir=data_dir, out_dir=runs / key(config, stage, model, batch, steps, lr, seed, b),
                       resume=True, progress=False, device=device, **fixed)
    ledger = result["ledger"]
    seen = result["training"]["samples_processed"]
    return {"config": config, "stage": stage, "model": model, "full_batch_size": batch, "batch_size": b,
            "steps": ledger["steps"], "lr": lr, "sigma": round(ledger["noise_multiplier"], 4),
            "sigma_over_B": f"{ledger['noise_multiplier'] / b:.3e}", "epsilon_target": EPSILON,
            "epsilon_spent": round(ledger["epsilon"], 3), "seed": seed, "accuracy": result["test"]["accuracy"],
            "samples": seen, "train_time_s": round(time.time() - t0, 1),
            "samples_per_s": round(seen / max(result["training"]["wall_time_s"], 1e-9), 1)}


def run_batch(stage: str, batch: int, steps: int, cfg: dict) -> int:
    return batch // shrink_for(full_sigma(batch, steps), cfg) if stage == "search" else batch


def best_points(rows: list[dict], config: str) -> dict:
    """model -> the (B, S, lr) of its best simulated run (mean accuracy over the search seeds)."""
    acc: dict = {}
    for r in rows:
        if r["stage"] == "search" and r["config"] == config:
            acc.setdefault((r["model"], int(r["full_batch_size"]), int(r["steps"]), float(r["lr"])), []).append(
                float(r["accuracy"]))
    best: dict = {}
    for (model, b, s, lr), vals in acc.items():
        m = statistics.fmean(vals)
        if model not in best or m > best[model][1]:
            best[model] = ((b, s, lr), m)
    return {model: point for model, (point, _) in best.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    search = [r for r in rows if r["stage"] == "search"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for model in sorted({r["model"] for r in search}):
        for bf, steps in sorted({(int(r["full_batch_size"]), int(r["steps"])) for r in search if r["model"] == model}):
            pts = sorted((float(r["lr"]), float(r["accuracy"])) for r in search if r["model"] == model
                         and int(r["steps"]) == steps and int(r["full_batch_size"]) == bf)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model}, B={bf}, S={steps}")
    ax.set_xscale("log")
    ax.set(title="CIFAR-10, TAN simulations of epsilon 8 recipes", xlabel="learning rate", ylabel="test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], config: str) -> str:
    lines = [f"### Private CIFAR-10 on the CPU: `{config}` configuration", "",
             "From `eval/study_cifar10.py --config release` (ε = 8, δ = 1e-5, RDP, N = 50,000). `search` rows are "
             "TAN simulations at a smaller batch (B run) with the full run's steps and σ/B, simulated σ kept ≥ 0.5: "
             "they choose the recipe and are **not** private at ε = 8 (ε spent is given). `full` rows are the chosen "
             "recipe at full privacy, public seeds "
             "(measurements, not releases). Samples are training samples through the per-sample gradient; "
             "samples/s is for the whole run on 2 CPU cores (x86_64).", "",
             "| stage | model | B (full) | B run | S | lr | σ | ε spent | seeds | test accuracy | samples | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["stage"], r["model"], int(r["full_batch_size"]), int(r["batch_size"]), int(r["steps"]),
                           float(r["lr"])), []).append(r)
    for (stage, model, bf, b, s, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "search", kv[0])):
        acc = [float(r["accuracy"]) for r in rs]
        cell = f"{statistics.fmean(acc):.4f}" + (f" ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else "")
        lines.append(f"| {stage} | `{model}` | {bf} | {b} | {s} | {lr:g} | {float(rs[0]['sigma']):.3f} | "
                     f"{float(rs[0]['epsilon_spent']):.2f} | {len(rs)} | {cell} | {int(float(rs[0]['samples'])):,} | "
                     f"{statistics.fmean(float(r['samples_per_s']) for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = study_parser(__doc__, "cifar10", CONFIGS)
    ap.add_argument("--stage", choices=["search", "full", "both"], default="both")
    ap.add_argument("--models", nargs="+")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    models = args.models or list(cfg["models"])
    out, runs, csv_path, rows = study_dirs("cifar10", args.config, args.out, args.runs)
    redraw = lambda rs: report(rs, out, args.config, plot, table, PLOT)  # noqa: E731
    done = {key(r["config"], r["stage"], r["model"], int(r["full_batch_size"]), int(r["steps"]), float(r["lr"]),
                int(r["seed"]), int(r["batch_size"])) for r in rows}

    def go(stage, model, point, seed):
        b, s, lr = point
        if args.steps:
            s = args.steps
        k = key(args.config, stage, model, b, s, lr, seed, run_batch(stage, b, s, cfg))
        if k in done:
            return
        print(f"{k} ...", file=sys.stderr, flush=True)
        row = run_point(model, cfg["models"][model]["fixed"], b, s, lr, seed, stage, cfg, runs, args.config,
                        args.data_dir, args.device)
        record(rows, row, csv_path, FIELDS, redraw,
               summary=f"    accuracy {row['accuracy']:.4f}, epsilon {row['epsilon_spent']}, "
                       f"{row['samples_per_s']} samples/s, {row['train_time_s']} s")

    with memoized_fixed_layers(MEMO_BYTES):  # the ScatterNet runs share one scattering of each image (zoo.layers)
        if args.stage in ("search", "both"):
            for model in models:
                for point in cfg["models"][model]["points"]:
                    for seed in cfg["search_seeds"]:
                        go("search", model, point, seed)
        if args.stage in ("full", "both"):
            chosen = best_points(rows, args.config)
            for model in models:
                if model in chosen and cfg["models"][model]["full"]:
                    print(f"{model}: full runs of the best simulated recipe B, S, lr = {chosen[model]}",
                          file=sys.stderr)
                    for seed in cfg["full_seeds"]:
                        go("full", model, chosen[model], seed)
    return close(rows, csv_path, out / PLOT, redraw)


if __name__ == "__main__":
    sys.exit(main())
