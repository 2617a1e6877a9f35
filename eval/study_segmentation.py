"""Study: which segmentation architectures work under DP? Dice against epsilon, per architecture and data set.

Grid: data set (ISBI 2012 EM membranes: medical; Weizmann horses: non-medical) x architecture (every registered
segmentation model that is not a test model) x epsilon (inf, 8, 3, 1) x seed. epsilon = inf is the noise-free
reference: the same recipe with sigma = 0 (clipping, sampling and schedule kept, so only the noise differs).
Each run trains with ``zoo.train`` (DP-SGD, Poisson sampling, RDP accountant, the data set's delta, EMA
weights for evaluation) and appends one row to ``<out>/results.csv``: Dice and IoU per class and their mean
over the foreground classes on the test split, sigma, steps, epsilon spent, parameters, the per-sample
gradient memory of one micro-batch (``physical_batch_size x augmult`` views, float32, the tensors opacus
keeps), peak GPU memory of the run where there is a GPU, and the time.

Resumable: finished rows are skipped; an interrupted run resumes from its last checkpoint (``--runs``).
After every run ``<out>/dice_vs_epsilon.png`` and ``<out>/results.md`` (mean +- std over seeds; MODEL_CARD.md
includes it) are rewritten.

Configurations:
  cpu  every architecture at half its card's width (``model_args``: unet-w32 runs at 16, the others at 8), one
       seed; ISBI resized to 128x128 and trained on 64x64 crops (N=20, q=1: every slice in every step, 30 steps),
       horses at 64x64 (N=222, expected batch 32, 40 steps); 2 views per sample: well under an hour on 2 cores.
       It checks the pipeline and shows first trends; the numbers are not those of the cards' recipes.
  gpu  the cards' architectures at their own width, 3 seeds; ISBI at 512x512 on 256x256 crops, horses at
       256x256 on 192x192 crops, augmentation multiplicity 4, 300 steps.
Reproduce:  python eval/study_segmentation.py --config cpu
"""
from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import zoo
from _results import close, record, study_dirs, study_parser
from zoo.data import get_dataset_info
from zoo.dp import tan
from zoo.training.engine import load_split
from zoo.io import write_text

EPSILONS = [math.inf, 8.0, 3.0, 1.0]
DATASETS = {"isbi2012": {"delta": 1e-4}, "weizmann-horse": {"delta": 1e-4}}  # delta < 1/N (N = 20 and 222)
CONFIGS = {
    "cpu": {"seeds": [0], "width_scale": 0.5,
            "recipes": {"isbi2012": {"resize": 128, "crop": 64, "batch_size": 20, "physical_batch_size": 10,
                                     "steps": 30, "augmult": 2},
                        "weizmann-horse": {"resize": 64, "crop": None, "batch_size": 32, "physical_batch_size": 32,
                                           "steps": 40, "augmult": 2}}},
    "gpu": {"seeds": [0, 1, 2], "width_scale": 1.0,
            "recipes": {"isbi2012": {"resize": None, "crop": 256, "batch_size": 20, "physical_batch_size": 10,
                                     "steps": 300, "augmult": 4},
                        "weizmann-horse": {"resize": None, "crop": 192, "batch_size": 64, "physical_batch_size": 32,
                                           "steps": 300, "augmult": 4}}},
}
COMMON = {"lr": 0.5, "momentum": 0.9, "clip_norm": 1.0, "ema_decay": 0.99, "accountant": "rdp"}
FIELDS = ["config", "dataset", "model", "model_args", "params", "epsilon", "delta", "seed", "batch_size", "steps",
          "sigma", "epsilon_spent", "dice", "iou", "dice_0", "iou_0", "dice_1", "iou_1", "psg_mib",
          "peak_gpu_mib", "train_time_s"]


def segmentation_models() -> list[str]:
    return [n for n in zoo.list_models() if zoo.model_info(n)["task"] == "segmentation" and not n.startswith("test-")]


def model_args(model: str, scale: float) -> dict:
    """The card's architecture at ``scale`` times its width (the CPU configuration halves every model)."""
    width = zoo.model_info(model)["args"].get("width")
    return {} if scale == 1.0 or width is None else {"width": max(1, round(width * scale))}


def key(config: str, dataset: str, model: str, epsilon: float, seed: int) -> str:
    return f"{config}-{dataset}-{model}-eps{epsilon:g}-seed{seed}"


def _eps_label(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def plot(rows: list[dict], path: Path, trivial: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    finite = sorted({float(r["epsilon"]) for r in rows if not math.isinf(float(r["epsilon"]))})
    inf_x = 2 * max(finite) if finite else 16.0  # where epsilon = inf is drawn
    for ax, dataset in zip(axes[0], datasets):
        for model in sorted({r["model"] for r in rows if r["dataset"] == dataset}):
            pts = _summary(rows, dataset, model)
            xs = [inf_x if math.isinf(e) else e for e, _, _, _ in pts]
            margs = next(r["model_args"] for r in rows if r["dataset"] == dataset and r["model"] == model)
            ax.errorbar(xs, [m for _, m, _, _ in pts], yerr=[s for _, _, s, _ in pts], marker="o", capsize=3,
                        label=f"{model} ({_args(margs)})")
        ax.axhline(trivial[dataset], color="gray", linestyle="--", linewidth=1, label="foreground everywhere")
        ticks = finite + [inf_x]
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["∞"])
        ax.minorticks_off()
        ax.set(title=f"{dataset} (test split)", xlabel="ε (δ as in the CSV; ∞: σ = 0)",
               ylabel="foreground Dice")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(rows, dataset, model):
    """``[(epsilon, mean Dice, std Dice, seeds)]`` sorted by epsilon."""
    out = []
    for eps in sorted({float(r["epsilon"]) for r in rows}):
        vals = [float(r["dice"]) for r in rows if r["dataset"] == dataset and r["model"] == model
                and float(r["epsilon"]) == eps]
        if vals:
            out.append((eps, statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)))
    return out


@functools.lru_cache(maxsize=None)  # the report is redrawn after every run; the test split does not change
def all_foreground_dice(dataset: str, resize: int | None, data_dir) -> float:
    """Dice of the trivial prediction "every pixel is foreground" on the test split: ``2p / (1 + p)`` for a
    foreground fraction p. A model under it has learned nothing a constant would not give."""
    p = load_split(dataset, "test", {"resize": resize}, data_dir).masks.ne(0).double().mean().item()
    return 2 * p / (1 + p)


def _noise_to_signal(rows: list[dict], dataset: str, model: str, epsilon: float) -> str:
    """The run's best-case noise-to-signal ratio (:func:`zoo.dp.tan.noise_to_signal`: sqrt(params) sigma / (B sqrt(S)));
    above about 1 the noise's random walk outruns everything the gradients can add."""
    r = next((r for r in rows if r["dataset"] == dataset and r["model"] == model and float(r["epsilon"]) == epsilon),
             None)
    if r is None:
        return "—"
    ratio = tan.noise_to_signal(int(r["params"]), float(r["sigma"]), float(r["batch_size"]), int(r["steps"]))
    return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"


def _args(text: str) -> str:
    """``"{'width': 8}"`` (the CSV's model_args) as ``width 8``; the card's own arguments as ``card``."""
    return text.strip("{}").replace("'", "").replace(":", "") or "card"


def table(rows: list[dict], config: str, trivial: dict[str, float]) -> str:
    """Markdown: foreground Dice (mean ± std over seeds) per architecture and epsilon, one table per data set."""
    lines = [f"### Segmentation under DP: `{config}` configuration", "",
             f"Foreground Dice on the test split (mean ± std over seeds), from `eval/study_segmentation.py --config "
             f"{config}` (`{config}` settings in its docstring). ε = ∞: the same recipe with σ = 0. Noise / signal: "
             "the run's best-case ratio of its summed noise to its summed clipped gradients, √params · σ / (B √S) "
             "(`zoo.dp.tan.noise_to_signal`); above about 1 the noise outruns anything the data can add.", ""]
    epsilons = sorted({float(r["epsilon"]) for r in rows}, reverse=True)
    for dataset in sorted({r["dataset"] for r in rows}):
        delta = next(r["delta"] for r in rows if r["dataset"] == dataset)
        lines += [f"**{dataset}** (δ = {delta}, RDP; predicting foreground everywhere scores "
                  f"{trivial[dataset]:.3f})", "",
                  "| model | args | params | per-sample grads (MiB / micro-batch) | noise / signal at ε = "
                  + ", ".join(_eps_label(e) for e in epsilons if not math.isinf(e)) + " | "
                  + " | ".join(f"ε = {_eps_label(e)}" for e in epsilons) + " |",
                  "|---|---|---:|---:|---|" + "---:|" * len(epsilons)]
        for model in sorted({r["model"] for r in rows if r["dataset"] == dataset}):
            first = next(r for r in rows if r["dataset"] == dataset and r["model"] == model)
            cells = {e: f"{m:.3f} ± {s:.3f} ({n})" if n > 1 else f"{m:.3f}"
                     for e, m, s, n in _summary(rows, dataset, model)}
            ratios = ", ".join(_noise_to_signal(rows, dataset, model, e) for e in epsilons if not math.isinf(e))
            lines.append(f"| `{model}` | {_args(first['model_args'])} | {int(first['params']):,} | "
                         f"{float(first['psg_mib']):.1f} | {ratios} | "
                         + " | ".join(cells.get(e, "—") for e in epsilons) + " |")
        lines.append("")
    return "\n".join(lines)


def report(rows: list[dict], out: Path, config: str, data_dir) -> None:
    """Redraw ``dice_vs_epsilon.png`` and rewrite ``results.md`` from all rows."""
    trivial = {d: all_foreground_dice(d, CONFIGS[config]["recipes"][d]["resize"], data_dir)
               for d in sorted({r["dataset"] for r in rows})}
    plot(rows, out / "dice_vs_epsilon.png", trivial)
    write_text(out / "results.md", table(rows, config, trivial) + "\n")


def main() -> int:
    ap = study_parser(__doc__, "segmentation", CONFIGS)
    ap.add_argument("--models", nargs="+", help="subset of the architectures (default: all registered)")
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    ap.add_argument("--epsilons", nargs="+", type=float, default=EPSILONS)
    ap.add_argument("--limit", type=int, help="stop after this many new runs (smoke tests)")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    out, runs, csv_path, rows = study_dirs("segmentation", args.config, args.out, args.runs)
    redraw = lambda rs: report(rs, out, args.config, args.data_dir)  # noqa: E731
    done = {key(r["config"], r["dataset"], r["model"], float(r["epsilon"]), int(r["seed"])) for r in rows}
    models = args.models or segmentation_models()
    grid = [(d, m, e, s) for d in args.datasets for m in models for e in args.epsilons for s in cfg["seeds"]]
    ran = 0
    for i, (dataset, model, eps, seed) in enumerate(grid, 1):
        k = key(args.config, dataset, model, eps, seed)
        if k in done:
            continue
        if args.limit is not None and ran >= args.limit:
            break
        ran += 1
        recipe = {**COMMON, **cfg["recipes"][dataset]}
        if args.steps:
            recipe["steps"] = args.steps
        print(f"[{i}/{len(grid)}] {k} ...", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        margs = model_args(model, cfg["width_scale"])
        result = zoo.train(model, dataset=dataset, epsilon=eps, delta=DATASETS[dataset]["delta"], seed=seed,
                           data_dir=args.data_dir, out_dir=runs / k, resume=True, progress=False,
                           model_args=margs, device=args.device, **recipe)
        test, ledger = result["test"], result["ledger"]
        classes = get_dataset_info(dataset).classes
        row = {"config": args.config, "dataset": dataset, "model": model, "model_args": str(margs),
               "params": result["num_params"], "epsilon": eps, "delta": DATASETS[dataset]["delta"], "seed": seed,
               "batch_size": recipe["batch_size"], "steps": ledger["steps"], "sigma": ledger["noise_multiplier"],
               "epsilon_spent": ledger["epsilon"], "dice": test["dice"], "iou": test["iou"],
               "psg_mib": result["num_params"] * 4 * recipe["physical_batch_size"] * recipe["augmult"] / 2 ** 20,
               "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else "",
               "train_time_s": round(time.time() - t0, 1)}
        for c, name in enumerate(classes):
            row[f"dice_{c}"], row[f"iou_{c}"] = test[f"dice_{name}"], test[f"iou_{name}"]
        record(rows, row, csv_path, FIELDS, redraw)
        print(f"    Dice {row['dice']:.3f} (IoU {row['iou']:.3f}), epsilon {ledger['epsilon']:.2f}, "
              f"sigma {ledger['noise_multiplier']:.2f}, {row['train_time_s']} s", file=sys.stderr)
    return close(rows, csv_path, out / "dice_vs_epsilon.png", redraw)


if __name__ == "__main__":
    sys.exit(main())
