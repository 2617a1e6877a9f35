"""Study: gradient self-alignment (zoo.dp.alignment) against plain DP-SGD at equal epsilon, on CIFAR-10 and PneumoniaMNIST.

Grid: data set x alignment (``off``: plain DP-SGD; ``all``: every coordinate; ``subset``: the ``align_fraction`` of
coordinates with the largest public reference, see zoo.dp.alignment; each at the configuration's weights lambda) x
epsilon x seed. Within a (data set, epsilon,
seed) cell every variant uses the same recipe, sampling rate, step count and therefore the same sigma: alignment
changes what each sample contributes, never the privacy cost (the ledgers are equal; the CSV shows it).
Each run trains with ``zoo.train`` and appends one row to ``<out>/results.csv`` (test accuracy, balanced accuracy,
ROC-AUC, sigma, epsilon spent, time); ``alignment.png`` and ``results.md`` (included in MODEL_CARD.md) are
redrawn after each. Resumable: finished rows are skipped, interrupted runs resume from their checkpoints.

Configurations:
  cpu  wrn16-1, epsilon 8, 3 seeds, f = 0.1; lambda = 1 (and 0.1 on PneumoniaMNIST). CIFAR-10 (delta 1e-5): B=256 (q=0.005), 50 steps;
       PneumoniaMNIST (delta 1e-4): B=128 (q=0.027), 50 steps; K=1, lr 2, clip 1. About 40 minutes on 2 cores
       (an aligned step costs several plain ones on the CPU: a per-sample Hessian-vector product). A pipeline
       check with first trends, not a verdict.
  gpu  wrn16-4 on CIFAR-10 (B=1024, 1000 steps, K=4) and wrn16-1-pneumonia's recipe (B=512, 400 steps, K=4),
       epsilon 8 and 3, lambda 1 and 0.1, 3 seeds.
Reproduce:  python eval/study_alignment.py --config cpu
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import zoo
from _results import (LABELS, METRICS, classification_fields, classification_summary, close, record, report,
                      study_dirs, study_parser)
from zoo.dp.alignment import ALIGN_MODES, DEFAULT_FRACTION, DEFAULT_WEIGHT

COMMON = {"clip_norm": 1.0, "lr": 2.0, "momentum": 0.0, "ema_decay": 0.99, "accountant": "rdp",
          "align_weight": DEFAULT_WEIGHT, "align_fraction": DEFAULT_FRACTION}
CONFIGS = {
    "cpu": {"seeds": [0, 1, 2], "epsilons": [8.0],
            "runs": {"cifar10": ("wrn16-1", {"delta": 1e-5, "batch_size": 256, "physical_batch_size": 128,
                                             "steps": 50, "augmult": 1}),
                     "pneumoniamnist": ("wrn16-1-pneumonia", {"delta": 1e-4, "batch_size": 128,
                                                              "physical_batch_size": 128, "steps": 50,
                                                              "augmult": 1})},
            "weights": {"cifar10": [1.0], "pneumoniamnist": [1.0, 0.1]}},
    "gpu": {"seeds": [0, 1, 2], "epsilons": [8.0, 3.0],
            "runs": {"cifar10": ("wrn16-4", {"delta": 1e-5, "batch_size": 1024, "physical_batch_size": 128,
                                             "steps": 1000, "augmult": 4, "ema_decay": 0.999}),
                     "pneumoniamnist": ("wrn16-1-pneumonia", {"delta": 1e-4, "batch_size": 512,
                                                              "physical_batch_size": 128, "steps": 400,
                                                              "augmult": 4, "ema_decay": 0.999})},
            "weights": {"cifar10": [1.0, 0.1], "pneumoniamnist": [1.0, 0.1]}},
}
PLOT = "alignment.png"
FIELDS = ["config", "dataset", "model", "align", "align_weight", "align_fraction", "epsilon", "delta", "seed",
          "batch_size", "steps", "sigma", "epsilon_spent", *METRICS, "train_time_s"]


def variant(align: str, weight) -> tuple[str, float | None]:
    """What distinguishes the compared runs: the alignment mode and its lambda (none for plain DP-SGD)."""
    return (align, None) if align == "off" else (align, float(weight))


def variant_label(v: tuple[str, float | None]) -> str:
    return v[0] if v[1] is None else f"{v[0]}, λ={v[1]:g}"


def key(config, dataset, v: tuple[str, float | None], epsilon, seed) -> str:
    tag = v[0] if v[1] in (None, DEFAULT_WEIGHT) else f"{v[0]}-w{v[1]:g}"
    return f"{config}-{dataset}-{tag}-eps{epsilon:g}-seed{seed}"


def _variants(rows, dataset, epsilon) -> list[tuple[str, float | None]]:
    found = {variant(r["align"], r["align_weight"]) for r in rows
             if r["dataset"] == dataset and float(r["epsilon"]) == epsilon}
    return sorted(found, key=lambda v: (ALIGN_MODES.index(v[0]), -(v[1] or 0)))


def _summary(rows, dataset, epsilon, v, metric):
    vals = [float(r[metric]) for r in rows if r["dataset"] == dataset and variant(r["align"], r["align_weight"]) == v
            and float(r["epsilon"]) == epsilon]
    return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)) if vals else None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["dataset"], float(r["epsilon"])) for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4.2), squeeze=False)
    for ax, (dataset, eps) in zip(axes[0], cells):
        variants = _variants(rows, dataset, eps)
        width = 0.8 / len(variants)
        for j, v in enumerate(variants):
            stats = [_summary(rows, dataset, eps, v, m) for m in METRICS]
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(METRICS))]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=variant_label(v))
        ax.set_xticks(range(len(METRICS)), [LABELS[m] for m in METRICS])
        ax.set(title=f"{dataset}, ε = {eps:g} (test)", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], config: str) -> str:
    lines = [f"### Gradient self-alignment: `{config}` configuration", "",
             f"Test metrics (mean ± std over seeds) at equal ε, from `eval/study_alignment.py --config {config}` "
             "(settings in its docstring): `off` is plain DP-SGD, `all` aligns every coordinate, `subset` the "
             "coordinates with the largest public reference (`zoo.dp.alignment`). σ is the same within a row.", "",
             "| data set | model | ε | σ | alignment | λ | f | accuracy | balanced accuracy | ROC-AUC | time (s) |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for dataset, eps in sorted({(r["dataset"], float(r["epsilon"])) for r in rows}):
        for v in _variants(rows, dataset, eps):
            sel = [r for r in rows if r["dataset"] == dataset and float(r["epsilon"]) == eps
                   and variant(r["align"], r["align_weight"]) == v]
            cells = []
            for m in METRICS:
                mean, std, n = _summary(rows, dataset, eps, v, m)
                cells.append(f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")
            lines.append(f"| {dataset} | `{sel[0]['model']}` | {eps:g} | {float(sel[0]['sigma']):.2f} | {v[0]} | "
                         f"{'—' if v[1] is None else f'{v[1]:g}'} | "
                         f"{sel[0]['align_fraction'] if v[0] == 'subset' else '—'} | " + " | ".join(cells)
                         + f" | {statistics.fmean(float(r['train_time_s']) for r in sel):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = study_parser(__doc__, "alignment", CONFIGS)
    ap.add_argument("--datasets", nargs="+", choices=sorted(CONFIGS["cpu"]["runs"]),
                    default=sorted(CONFIGS["cpu"]["runs"]))
    ap.add_argument("--aligns", nargs="+", choices=ALIGN_MODES, default=list(ALIGN_MODES))
    ap.add_argument("--weights", nargs="+", type=float, help="lambdas of the aligned runs (default: the config's)")
    ap.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the config's)")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    out, runs, csv_path, rows = study_dirs("alignment", args.config, args.out, args.runs)
    redraw = lambda rs: report(rs, out, args.config, plot, table, PLOT)  # noqa: E731
    done = {key(r["config"], r["dataset"], variant(r["align"], r["align_weight"]), float(r["epsilon"]),
                int(r["seed"])) for r in rows}
    grid = [(d, e, s, v) for d in args.datasets for e in cfg["epsilons"] for s in (args.seeds or cfg["seeds"])
            for v in dict.fromkeys(variant(a, w) for a in args.aligns for w in (args.weights or cfg["weights"][d]))]
    for i, (dataset, eps, seed, (align, weight)) in enumerate(grid, 1):
        k = key(args.config, dataset, (align, weight), eps, seed)
        if k in done:
            continue
        print(f"[{i}/{len(grid)}] {k} ...", file=sys.stderr, flush=True)
        model, recipe = cfg["runs"][dataset]
        recipe = {**COMMON, **recipe, "align": align, "align_weight": weight or DEFAULT_WEIGHT}
        if args.steps:
            recipe["steps"] = args.steps
        t0 = time.time()
        result = zoo.train(model, dataset=dataset, epsilon=eps, seed=seed, data_dir=args.data_dir, out_dir=runs / k,
                           resume=True, progress=False, device=args.device, **recipe)
        row = {"config": args.config, "dataset": dataset, "model": model, "align": align,
               "align_weight": recipe["align_weight"], "align_fraction": recipe["align_fraction"], "epsilon": eps,
               "delta": recipe["delta"], "seed": seed, "batch_size": recipe["batch_size"],
               **classification_fields(result, t0)}
        record(rows, row, csv_path, FIELDS, redraw, summary=classification_summary(result, row["train_time_s"]))
    return close(rows, csv_path, out / PLOT, redraw)


if __name__ == "__main__":
    sys.exit(main())
