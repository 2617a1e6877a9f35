"""Study: accuracy of L0-sparse WideResNets under DP against their open channels, beside the dense twin.

Grid: data set x setting x epsilon x seed. A setting is the dense twin (no gates) or a gated network at one
``l0_lambda`` (Louizos et al.'s lambda: the price of a kept parameter against the mean loss of one sample, over N;
:mod:`zoo.nn.sparse`) and gate scale ``k`` (``l0_gate_scale``: DP-SGD trains ``log_alpha / k``, which gives the
gates ``k`` times their share of the clipping budget; without it their signal sits below the DP noise and they
close together or not at all, ``eval/l0_gate_signal.py``). Each run trains with ``zoo.train`` (DP-SGD, RDP),
prunes the EMA model with ``zoo.prune`` and appends one row to ``results.csv``: test accuracy (and balanced
accuracy, ROC-AUC) of the EMA model (the pruned network has the same outputs, tests/test_sparse.py), the fraction
of channel gates left open, parameters and FLOPs before and after pruning, sigma, batch size, steps, samples, time.
``results.md`` (included in MODEL_CARD.md) and ``accuracy_vs_sparsity.png`` are redrawn after every run.
Resumable: finished rows are skipped and an interrupted run resumes from its last checkpoint. The DP step time of
a pruned network against its dense twin: ``python eval/bench_prune.py --runs <the runs folder>``.

Configurations:
  cpu  ``test-wrn10-1-l0``, batch 256, 30 steps, CIFAR-10 on a 5,000-image subset (1,000 test images), all
       of PneumoniaMNIST (624 test images), lambda in {0, 0.1, 1, 10}, epsilon 2 and 8: a few minutes on 2 cores.
       It checks the pipeline; the gates do not learn at this size.
  budget  the CPU study (issue 18): ``wrn16-1-pneumonia`` and ``wrn16-1`` (0.18M parameters) with and without
       gates at epsilon 8, privacy parameters from ``zoo.privacy.tan.propose(8, delta, N, steps=S, sigma=s)``
       alone (PneumoniaMNIST: S=400, s=1 -> B=371, 148,400 samples per run, delta 1e-4; CIFAR-10: S=200, s=0.7 ->
       B=3585, 717,000 samples, delta 1e-5), the cards' lr 2, clip 1, no momentum, EMA 0.999, K=1. The lambda
       grid is placed around the balance of the penalty with the gates' data signal measured at initialisation
       (``eval/l0_gate_signal.py --model wrn16-1-pneumonia --model-args '{"l0": true}' --batch-size 371 --steps
       400``: the dearest gate's penalty equals the rms signal near lambda 0.006 on PneumoniaMNIST and, with N ten
       times larger, near 0.06 on CIFAR-10); the ratio of penalty to signal does not depend on k, while the
       distance both move the gates in a run grows by k^2 and the noise's by k. k = 1 at two lambdas shows the two
       failure modes (nothing moves; everything closes together). About 6 minutes per PneumoniaMNIST run and
       about 40 minutes per CIFAR-10 run on 2 idle cores, so CIFAR-10 runs only the dense twin and the settings
       chosen on PneumoniaMNIST: there gate scale 30 at lambda 0.003 and 0.01 kept 6 % and 3 % of the channels
       within a point of the twin (seed 0), so CIFAR-10 first ran gate scale 30 at lambda 0.06, whose penalty
       moves log_alpha as far in its run as 0.003 does on PneumoniaMNIST (the pull over a run is S lambda / N).
       It kept 3 % of the channels and lost 12 points (0.3556 against the twin's 0.4723): ten classes need more
       channels, so the next settings keep more: gate scale 30 at lambda 0.006, and gate scale 10 at 0.06 (the
       counterpart of PneumoniaMNIST's k=10, lambda 0.003, which kept 25 %). Gate scale 30 at lambda 0.006 kept
       37 % and lost 4.7 points (0.4250), so a last control, gate scale 30 at lambda 0, separates what the gates
       cost by themselves (their sampled masks: dropout on a network that underfits at this budget) from what
       closing channels costs. Its 0.4363 (every channel open) says the gates cost 3.6 of the 4.7 points by
       themselves and closing 63 % of the channels only 1.1 more; gate scale 10 at lambda 0.06 (29 % open)
       scored 0.3730. The test of that reading: gate scale 30 at lambda 0.006 with an initial drop rate of 0.05
       instead of 0.3 (``l0_drop_rate``: next to no masking at the start). Public seed 0 (a measurement, not a
       release); then public seeds 1 and 2 of the settings a comparison rests on (``more_seeds``: on
       PneumoniaMNIST the dense twin and gate scale 30 at lambda 0.01, the smallest network within a point of the
       twin at seed 0 and the recipe of the sparse release ``wrn16-1-pneumonia-l0``).
  gpu  ``wrn16-4-l0`` with the batch size, sigma and steps that TAN proposes for each (epsilon, N)
       (``zoo.privacy.tan.propose``), augmentation multiplicity 16, the full data sets.
Reproduce:  python eval/study_sparsity.py --config budget --datasets pneumoniamnist
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import zoo
from _fixtures import register_fixture_models
from _results import METRICS, append_row, close, finished_run, mean_std, report, study_dirs, study_parser
from zoo.data import get_dataset_info
from zoo.nn.sparse import count_flops, gate_modules
from zoo.privacy import tan


def gated(l0_lambda: float, scale: float = 1.0, drop_rate: float | None = None) -> dict:
    """The model arguments of a gated setting (``drop_rate``: the gates' initial probability of a closed gate,
    ``l0_drop_rate``; the family's default 0.3 when None)."""
    return {"l0": True, "l0_lambda": l0_lambda, "l0_gate_scale": scale,
            **({} if drop_rate is None else {"l0_drop_rate": drop_rate})}


DENSE = {"l0": False}
_BUDGET = {"physical_batch_size": 128, "clip_norm": 1.0, "lr": 2.0, "momentum": 0.0, "augmult": 1,
           "ema_decay": 0.999}
CONFIGS = {
    "cpu": {"epsilons": [2.0, 8.0], "seeds": [0],
            "datasets": {"cifar10": {"model": "test-wrn10-1-l0", "recipe": {"train_subset": 5000},
                                     "test_subset": 1000},
                         "pneumoniamnist": {"model": "test-wrn10-1-l0"}},
            "settings": [{"l0_lambda": w} for w in (0.0, 0.1, 1.0, 10.0)],
            "recipe": {"batch_size": 256, "physical_batch_size": 128, "steps": 30, "augmult": 1, "lr": 2.0}},
    "budget": {"epsilons": [8.0], "seeds": [0],
               "datasets": {"pneumoniamnist": {"model": "wrn16-1-pneumonia", "propose": {"steps": 400, "sigma": 1.0},
                                               "settings": [DENSE, gated(0.01), gated(0.1),
                                                            *(gated(w, k) for k in (10.0, 30.0)
                                                              for w in (0.003, 0.01, 0.03))],
                                               # the release's comparison (wrn16-1-pneumonia-l0): more seeds
                                               "more_seeds": {"settings": [DENSE, gated(0.01, 30.0)],
                                                              "seeds": [1, 2]}},
                            "cifar10": {"model": "wrn16-1", "propose": {"steps": 200, "sigma": 0.7},
                                        "settings": [DENSE, gated(0.06, 30.0), gated(0.006, 30.0),
                                                     gated(0.06, 10.0), gated(0.0, 30.0),
                                                     gated(0.006, 30.0, drop_rate=0.05)]}},
               "recipe": _BUDGET},
    "gpu": {"epsilons": [1.0, 3.0, 8.0], "seeds": [0],
            "datasets": {"cifar10": {"model": "wrn16-4-l0", "propose": {}},
                         "pneumoniamnist": {"model": "wrn16-4-l0", "propose": {}}},
            "settings": [{"l0_lambda": w} for w in (0.0, 0.001, 0.01, 0.1)],
            "recipe": {"physical_batch_size": 256, "augmult": 16}},
}
DATASET_SIZES = {"cifar10": 50_000, "pneumoniamnist": 4_708}
PLOT = "accuracy_vs_sparsity.png"
FIELDS = ["config", "dataset", "model", "setting", "l0", "l0_lambda", "gate_scale", "epsilon", "delta", "seed",
          "batch_size", "sigma", "steps", "samples", "epsilon_spent", *METRICS, "open_fraction", "branches_open",
          "params", "params_pruned", "flops", "flops_pruned", "train_time_s"]


def label(setting: dict) -> str:
    """A setting's name in keys and tables: ``dense``, ``l0lambda0.01``, ``l0lambda0.01-k10`` or
    ``l0lambda0.006-k30-drop0.05`` (an initial drop rate other than the family's)."""
    if setting.get("l0") is False:
        return "dense"
    k = float(setting.get("l0_gate_scale", 1.0))
    drop = setting.get("l0_drop_rate")
    return f"l0lambda{float(setting['l0_lambda']):g}" + (f"-k{k:g}" if k != 1.0 else "") + (
        f"-drop{float(drop):g}" if drop is not None else "")


def key(config: str, dataset: str, epsilon: float, setting: str, seed: int) -> str:
    return f"{config}-{dataset}-eps{epsilon:g}-{setting}" + (f"-seed{seed}" if seed else "")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, dataset in zip(axes, sorted(DATASET_SIZES)):
        for eps in sorted({float(r["epsilon"]) for r in rows}):
            mine = [r for r in rows if r["dataset"] == dataset and float(r["epsilon"]) == eps]
            series = lambda r: (float(r["gate_scale"] or 1), r["setting"].partition("-drop")[2])  # noqa: E731
            for k, drop in sorted({series(r) for r in mine if r["setting"] != "dense"}):
                pts = sorted((float(r["open_fraction"]), float(r["accuracy"])) for r in mine
                             if r["setting"] != "dense" and series(r) == (k, drop))
                ax.plot(*zip(*pts), marker="o", linestyle=":", label=f"ε = {eps:g}, gate scale {k:g}"
                        + (f", initial drop rate {drop}" if drop else ""))
            dense = [float(r["accuracy"]) for r in mine if r["setting"] == "dense"]
            if dense:
                ax.axhline(statistics.fmean(dense), color="k", linewidth=0.8, label=f"ε = {eps:g}, dense twin")
        ax.set(title=dataset, xlabel="fraction of channel gates open (1 = dense)", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], config: str) -> str:
    """Per data set and epsilon: every setting (mean ± std over seeds), its open channels, parameters and FLOPs
    before and after pruning, and its accuracy against the dense twin's."""
    lines = [f"### L0 sparsity under DP against the dense twin (`{config}`)", "",
             f"`python eval/study_sparsity.py --config {config}`; privacy parameters from `zoo.privacy.tan.propose` "
             "alone; accuracy of the EMA model (the pruned network computes the same outputs). Open channels: the "
             "fraction of channel gates whose test-time gate is above 0. DP step time of the pruned networks: "
             f"`python eval/bench_prune.py --runs runs/study-sparsity-{config}`.", ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        for eps in sorted({float(r["epsilon"]) for r in rows if r["dataset"] == dataset}, reverse=True):
            mine = [r for r in rows if r["dataset"] == dataset and float(r["epsilon"]) == eps]
            first = mine[0]
            lines += [f"**{dataset}, ε = {eps:g}** (`{first['model']}`, B = {first['batch_size']}, "
                      f"σ = {float(first['sigma']):.3f}, S = {first['steps']}, {int(first['samples']):,} samples "
                      f"per run, ε spent {float(first['epsilon_spent']):.3f}, δ = {float(first['delta']):g})", "",
                      "| setting | gate scale | λ | seeds | accuracy | balanced acc. | open channels "
                      "| params → pruned | MFLOPs → pruned | accuracy − dense |", "|---|---|---|---|---|---|---|---|---|---|"]
            dense = [float(r["accuracy"]) for r in mine if r["setting"] == "dense"]
            for setting in dict.fromkeys(r["setting"] for r in mine):
                rs = [r for r in mine if r["setting"] == setting]
                acc = [float(r["accuracy"]) for r in rs]
                gap = f"{statistics.fmean(acc) - statistics.fmean(dense):+.4f}" if dense and setting != "dense" else ""
                opened = statistics.fmean(float(r["open_fraction"]) for r in rs)
                p0, p1 = int(rs[0]["params"]), statistics.fmean(int(r["params_pruned"]) for r in rs)
                f0, f1 = int(rs[0]["flops"]) / 1e6, statistics.fmean(int(r["flops_pruned"]) for r in rs) / 1e6
                scale, lam = ("", "") if setting == "dense" else (rs[0]["gate_scale"], rs[0]["l0_lambda"])
                lines.append(
                    f"| {setting} | {scale} | {lam} "
                    f"| {len(rs)} | {mean_std(acc)} | {mean_std([float(r['balanced_accuracy']) for r in rs])} "
                    f"| {opened:.0%} | {p0:,} → {p1:,.0f} | {f0:.1f} → {f1:.1f} | {gap} |")
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = study_parser(__doc__, "sparsity", CONFIGS)
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASET_SIZES))
    ap.add_argument("--seed", type=int, help="one seed instead of the config's")
    ap.add_argument("--limit", type=int, help="stop after this many new runs (smoke tests)")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    register_fixture_models()  # the cpu config trains the test suite's tiny L0 WRN (tests/models)
    out, runs, csv_path, rows = study_dirs("sparsity", args.config, args.out, args.runs)
    redraw = lambda rs: report(rs, out, args.config, plot, table, PLOT)  # noqa: E731
    done = {key(r["config"], r["dataset"], float(r["epsilon"]), r["setting"], int(r["seed"])) for r in rows}
    seeds = [args.seed] if args.seed is not None else cfg["seeds"]
    chosen = {d: dcfg for d, dcfg in cfg["datasets"].items() if d in (args.datasets or cfg["datasets"])}
    grid = [(d, e, s, seed) for d, dcfg in chosen.items() for e in cfg["epsilons"]
            for s in dcfg.get("settings", cfg.get("settings")) for seed in seeds]
    if args.seed is None:  # then the settings that decide a comparison, over more seeds
        grid += [(d, e, s, seed) for d, dcfg in chosen.items() if "more_seeds" in dcfg for e in cfg["epsilons"]
                 for s in dcfg["more_seeds"]["settings"] for seed in dcfg["more_seeds"]["seeds"]]
    ran = 0
    for i, (dataset, eps, setting, seed) in enumerate(grid, 1):
        dcfg = cfg["datasets"][dataset]
        name = dcfg["model"]
        k = key(args.config, dataset, eps, label(setting), seed)
        if k in done:
            print(f"[{i}/{len(grid)}] {k}: done, skipped", file=sys.stderr)
            continue
        if args.limit is not None and ran >= args.limit:
            break
        ran += 1
        delta = zoo.model_info(name)["recipe"]["delta"]
        recipe = {**cfg["recipe"], **dcfg.get("recipe", {})}
        if "propose" in dcfg:
            p = tan.propose(eps, delta, DATASET_SIZES[dataset], **dcfg["propose"])
            recipe.update(batch_size=p["batch_size"], steps=p["steps"])
        if args.steps:
            recipe["steps"] = args.steps
        print(f"[{i}/{len(grid)}] {k} ...", file=sys.stderr, flush=True)
        result = finished_run(runs / k) or zoo.train(
            name, dataset=dataset, epsilon=eps, delta=delta, seed=seed, data_dir=args.data_dir, out_dir=runs / k,
            resume=True, test_subset=dcfg.get("test_subset"), progress=False, device=args.device, model_args=setting,
            **recipe)
        model, ledger, test = result["model_object"].cpu(), result["ledger"], result["test"]
        size = get_dataset_info(dataset).image_size
        gates = [m for m in gate_modules(model) if m.log_alpha.numel() > 1]  # one per channel
        branches = [m for m in gate_modules(model) if m.log_alpha.numel() == 1]  # one per residual branch
        if gates:
            _, rep = zoo.prune(model, input_size=size)
            sizes = dict(params=rep["params_before"], params_pruned=rep["params_after"], flops=rep["flops_before"],
                         flops_pruned=rep["flops_after"])
            opened = sum(int((g.eval().gates()[0] > 0).sum()) for g in gates) / sum(g.log_alpha.numel() for g in gates)
        else:
            n, f = sum(p.numel() for p in model.parameters()), count_flops(model, size)
            sizes, opened = dict(params=n, params_pruned=n, flops=f, flops_pruned=f), 1.0
        row = {"config": args.config, "dataset": dataset, "model": name, "setting": label(setting),
               "l0": int(bool(gates)), "l0_lambda": setting.get("l0_lambda", ""),
               "gate_scale": setting.get("l0_gate_scale", 1.0) if gates else "", "epsilon": eps, "delta": delta,
               "seed": seed, "batch_size": recipe["batch_size"], "sigma": ledger["noise_multiplier"],
               "steps": ledger["steps"], "samples": result["training"]["samples_processed"],
               "epsilon_spent": ledger["epsilon"], **{m: test.get(m, "") for m in METRICS},
               "open_fraction": round(opened, 4),
               "branches_open": f"{sum(int(b.eval().gates()[0, 0] > 0) for b in branches)}/{len(branches)}",
               **sizes, "train_time_s": result["training"]["wall_time_s"]}
        rows.append(row)
        append_row(csv_path, FIELDS, row)
        redraw(rows)
        print(f"    accuracy {row['accuracy']:.4f}, open {row['open_fraction']:.2f}, params {row['params']:,} -> "
              f"{row['params_pruned']:,}, {row['train_time_s']} s", file=sys.stderr, flush=True)
    return close(rows, csv_path, out / PLOT, redraw)


if __name__ == "__main__":
    sys.exit(main())
