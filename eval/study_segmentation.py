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
  budget  The question at budgets that train, recipes chosen as the release tier chooses them (TAN). Every
       architecture as one small network: width 4 and, where the family has it, depth 3 (``unet-w16`` and
       ``unet-w32`` are then one network, run once). At N = 20 ISBI slices, noise / signal goes as √d / N
       (``zoo.dp.tan.noise_to_signal``): the card widths (0.5-12 M parameters) sit at 20-300 and learn nothing,
       30 k parameters sit near 5. One budget per data set, the same for every architecture, in views x pixels:
         ISBI 2012   native 512x512 slices, 128x128 crops, B = N = 20 (q = 1), K = 2, S = 40:  26.2 M;
         horses      resized to 128x128, B = 32 of N = 222, K = 2, S = 300:                     315 M.
       Search: TAN's simulation at B / 2 (same S and sigma / B; not private at epsilon 8, its epsilon is in the
       row) over lr 0.25, 0.5, 1 at epsilon 8, seed 0, extended past an edge of the grid that scores best (half
       the smallest or twice the largest lr, up to 4 times: ``beyond_edge``); full runs at the chosen lr at
       epsilon 8, seed 0; seeds 1 and 2 there for the cells that decide the ranking (the 3 best and every
       equivariant one); then epsilon inf (sigma 0) and 3, seed 0 (in this order, so that a study stopped early
       has what the releases need first). ISBI also fine-tuned from public pretraining: the same
       network's noise-free horse run (public, non-medical data; the ledger keeps its record as the parent),
       training only the head and the norms (``trainable`` head+norm) or all parameters, each with its own lr
       search.
       Sized from one DP step per view of each network at 128x128 (1 thread, loaded machine: U-Net 40 ms, U-Net++
       74, LinkNet 24, DeepLabV3+ 23, D4 U-Net 74): about 20-45 idle minutes per architecture on the horses
       and 1-3 on ISBI, some 4-5 CPU hours in all; the table gives each network's measured s / step.
Reproduce:  python eval/study_segmentation.py --config cpu|gpu|budget
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
from _results import close, mean_std, record, study_dirs, study_parser
from zoo.data import get_dataset_info
from zoo.dp import tan
from zoo.privacy import calibrate_sigma, compute_epsilon
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
    # TAN-chosen recipes at one budget per data set, every architecture at the same small width (see the docstring)
    "budget": {"seeds": [0], "decide_seeds": [0, 1, 2], "decide_top": 3, "epsilons": [math.inf, 8.0, 3.0],
               "model_args": {"width": 4, "depth": 3},
               "search": {"epsilon": 8.0, "lrs": [0.25, 0.5, 1.0], "seed": 0, "shrink": 2, "extend": 4},
               "transfer": {"isbi2012": {"from": "weizmann-horse", "trainable": ["head+norm", None]}},
               "recipes": {"isbi2012": {"resize": None, "crop": 128, "batch_size": 20, "physical_batch_size": 10,
                                        "steps": 40, "augmult": 2},
                           "weizmann-horse": {"resize": 128, "crop": None, "batch_size": 32,
                                              "physical_batch_size": 32, "steps": 300, "augmult": 2}}},
}
COMMON = {"lr": 0.5, "momentum": 0.9, "clip_norm": 1.0, "ema_decay": 0.99, "accountant": "rdp"}
FIELDS = ["config", "dataset", "model", "model_args", "params", "epsilon", "delta", "seed", "batch_size", "steps",
          "sigma", "epsilon_spent", "dice", "iou", "dice_0", "iou_0", "dice_1", "iou_1", "psg_mib",
          "peak_gpu_mib", "train_time_s"]


def study_command(config: str) -> str:
    """How a card's recipe source names this study's configuration (``eval/release_cpu.py`` writes it)."""
    return f"eval/study_segmentation.py --config {config}"


def segmentation_models() -> list[str]:
    """The architectures of the study: every registered segmentation model except the test models and the releases
    of its budget configurations (a card whose recipe source names one, e.g. ``eq-unet-d4-w4-horse``: the study's
    network trained for one data set by ``eval/release_cpu.py``, not another architecture)."""
    released = [study_command(c) for c, cfg in CONFIGS.items() if "search" in cfg]
    infos = {n: zoo.model_info(n) for n in zoo.list_models() if not n.startswith("test-")}
    return [n for n, info in infos.items() if info["task"] == "segmentation"
            and not any(s in info["recipe"]["source"] for s in released)]


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


def _noise_to_signal(runs: list[dict], epsilon: float, params: str = "params") -> str:
    """The best-case noise-to-signal ratio (:func:`zoo.dp.tan.noise_to_signal`: sqrt(params) sigma / (B sqrt(S))) of
    the first of ``runs`` (rows of one data set and model) at ``epsilon``, over the parameters counted in column
    ``params``; above about 1 the noise's random walk outruns everything the gradients can add."""
    r = next((r for r in runs if float(r["epsilon"]) == epsilon), None)
    if r is None:
        return "—"
    ratio = tan.noise_to_signal(int(r[params]), float(r["sigma"]), float(r["batch_size"]), int(r["steps"]))
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
            runs = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
            ratios = ", ".join(_noise_to_signal(runs, e) for e in epsilons if not math.isinf(e))
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


# ---- the budget configurations: TAN-chosen recipes at one budget per data set ------------------------------------

BUDGET_FIELDS = ["config", "stage", "dataset", "model", "start", "trainable", "model_args", "params", "trained_params",
                 "epsilon", "delta", "seed", "full_batch_size", "batch_size", "steps", "lr", "sigma", "epsilon_spent",
                 "dice", "iou", "dice_0", "iou_0", "dice_1", "iou_1", "view_pixels", "psg_mib", "s_per_step",
                 "train_time_s"]
SCRATCH = "scratch"


def budget_args(model: str, margs: dict) -> dict:
    """The config's architecture arguments that ``model``'s family takes (``depth`` only where it has one)."""
    return {k: v for k, v in margs.items() if k in zoo.model_info(model)["args"]}


def architectures(models: list[str], margs: dict) -> list[str]:
    """One model per distinct network at the config's arguments, in order: ``unet-w16`` and ``unet-w32`` are one
    network at width 4, so only the first is run."""
    seen, out = set(), []
    for m in models:
        info = zoo.model_info(m)
        net = (info["family"], str(sorted({**info["args"], **budget_args(m, margs)}.items())))
        if net not in seen:
            seen.add(net)
            out.append(m)
    return out


def variants(dataset: str, cfg: dict) -> list[tuple[str, str | None]]:
    """``(start, trainable)`` of every way a data set's models are trained: from scratch (all parameters), and for a
    data set with a ``transfer`` entry, fine-tuned from the same network trained without noise on the public data
    set it names (its epsilon = inf run of the full stage), once per trainable spec."""
    t = cfg.get("transfer", {}).get(dataset)
    return [(SCRATCH, None)] + ([(t["from"], spec) for spec in t["trainable"]] if t else [])


def budget_key(config, stage, dataset, model, start, trainable, eps, seed, lr) -> str:
    how = "" if start == SCRATCH else f"-from-{start}-{(trainable or 'all').replace('+', '_')}"
    return f"{config}-{stage}-{dataset}-{model}{how}-eps{eps:g}-seed{seed}-lr{lr:g}"


def view_pixels(recipe: dict, dataset: str) -> int:
    """Pixels of one training view: the crop, else the resized image, else the data set's native size."""
    side = recipe.get("crop") or recipe.get("resize")
    if side:
        return int(side) ** 2
    _, h, w = get_dataset_info(dataset).image_size
    return h * w


@functools.lru_cache(maxsize=None)
def train_size(dataset: str, data_dir) -> int:
    """N, the number of training images: the unit of privacy is one image (an ISBI slice, a horse photograph)."""
    return len(load_split(dataset, "train", {}, data_dir))


def budget_row(config, stage, dataset, model, start, trainable, margs, eps, delta, seed, full_b, recipe, result,
               t0) -> dict:
    test, ledger, facts = result["test"], result["ledger"], result["training"]
    classes = get_dataset_info(dataset).classes
    row = {"config": config, "stage": stage, "dataset": dataset, "model": model, "start": start,
           "trainable": trainable or "all", "model_args": str(margs), "params": facts["trainable"]["of"],
           "trained_params": result["num_params"], "epsilon": eps, "delta": delta, "seed": seed,
           "full_batch_size": full_b, "batch_size": recipe["batch_size"], "steps": ledger["steps"],
           "lr": recipe["lr"], "sigma": ledger["noise_multiplier"], "epsilon_spent": ledger["epsilon"],
           "dice": test["dice"], "iou": test["iou"],
           "view_pixels": facts["samples_processed"] * view_pixels(recipe, dataset),
           "psg_mib": result["num_params"] * 4 * recipe["physical_batch_size"] * recipe["augmult"] / 2 ** 20,
           "s_per_step": round(facts["wall_time_s"] / max(ledger["steps"], 1), 3),
           "train_time_s": round(time.time() - t0, 1)}
    for c, name in enumerate(classes):
        row[f"dice_{c}"], row[f"iou_{c}"] = test[f"dice_{name}"], test[f"iou_{name}"]
    return row


def search_scores(rows: list[dict], config: str) -> dict:
    """``(dataset, model, start, trainable) -> {lr: mean simulated Dice over the search seeds}``."""
    acc: dict = {}
    for r in rows:
        if r["config"] == config and r["stage"] == "search":
            acc.setdefault((r["dataset"], r["model"], r["start"], r["trainable"]), {}).setdefault(
                float(r["lr"]), []).append(float(r["dice"]))
    return {k: {lr: statistics.fmean(d) for lr, d in by_lr.items()} for k, by_lr in acc.items()}


def best_lr(scores: dict[float, float]) -> float:
    """The lr of the best score in ``scores`` (lr -> mean Dice); among equal scores the smallest lr, the more
    cautious step (a network that scores 0 at every lr, having diverged, is then searched downward)."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def chosen_lrs(rows: list[dict], config: str) -> dict:
    """``(dataset, model, start, trainable) -> lr`` of the best simulated run (mean Dice over the search seeds;
    :func:`best_lr`)."""
    return {k: best_lr(by_lr) for k, by_lr in search_scores(rows, config).items()}


def beyond_edge(tried: list[float], best: float | None) -> float | None:
    """The next lr to search when the best simulated one sits at an edge of the lrs ``tried``: half the smallest or
    twice the largest (a grid whose best point is its edge has not bracketed the optimum); None when it is inside."""
    if best is None or len(tried) < 2:
        return None
    nxt = best / 2 if best == min(tried) else best * 2 if best == max(tried) else None
    return None if nxt is None or nxt in tried else nxt


def next_search_lr(grid: list[float], scores: dict[float, float], extend: int) -> float | None:
    """The next lr to simulate given the ``scores`` done so far (lr -> mean Dice), or None when the search is over:
    the ``grid`` first, then up to ``extend`` lrs past an edge of it that scores best (``beyond_edge``). It reads
    only ``scores``, so a resumed study searches the same lrs as one that ran without a stop."""
    tried = list(grid)
    for lr in grid:
        if lr not in scores:
            return lr
    for _ in range(extend):
        nxt = beyond_edge(tried, best_lr({lr: scores[lr] for lr in tried}))
        if nxt is None or nxt not in scores:
            return nxt
        tried.append(nxt)
    return None


def deciding(rows: list[dict], config: str, dataset: str, eps: float, top: int, seed: int = 0,
             lrs: dict | None = None) -> list[tuple]:
    """The variants that decide the ranking at ``eps``: the ``top`` best by their first full seed ``seed`` (at
    their chosen lr, ``lrs``: ``(dataset, model, start, trainable) -> lr``, when given), and every equivariant one
    (a release of it is due if it comes within 0.02 Dice of the best). It reads the first seed alone, so the
    ranking stays the same once the deciding seeds have run (a resumed study runs no other cells)."""
    first = {(r["model"], r["start"], r["trainable"]): float(r["dice"]) for r in rows
             if r["config"] == config and r["stage"] == "full" and r["dataset"] == dataset
             and float(r["epsilon"]) == eps and int(r["seed"]) == seed
             and (lrs is None or float(r["lr"]) == lrs.get((dataset, r["model"], r["start"], r["trainable"])))}
    best = sorted(first, key=first.get, reverse=True)[:top]
    return best + [v for v in first if v not in best and v[0].startswith("eq-")]


def run_budget(args, cfg: dict, out: Path, runs: Path, csv_path: Path, rows: list[dict]) -> int:
    """The study of a budget configuration, in stages (each resumable, finished rows skipped):
    search (TAN's simulation at ``B / shrink``, same S and sigma / B, over the lrs and past an edge of them that
    scores best, at the search epsilon), full (the chosen lr at the search epsilon, seed 0), decide (the cells that
    decide the ranking there: more seeds), then full at the other epsilons. Data sets with a transfer entry run
    after the data set they start from (their start is its noise-free run)."""
    config = args.config
    redraw = lambda rs: budget_report(rs, out, config, args.data_dir)  # noqa: E731
    done = {budget_key(r["config"], r["stage"], r["dataset"], r["model"], r["start"],
                       None if r["trainable"] == "all" else r["trainable"], float(r["epsilon"]), int(r["seed"]),
                       float(r["lr"])) for r in rows}
    models = architectures(args.models or segmentation_models(), cfg["model_args"])
    search = cfg["search"]
    sources = {t["from"] for t in cfg.get("transfer", {}).values()}
    datasets = sorted(args.datasets, key=lambda d: d not in sources)  # a transfer's public source first
    ran = [0]

    def go(stage, dataset, model, start, trainable, eps, seed, lr) -> dict | None:
        k = budget_key(config, stage, dataset, model, start, trainable, eps, seed, lr)
        if k in done:
            return None
        source = None
        if start != SCRATCH:  # the public source's noise-free run of the same network, seed 0 at its chosen lr
            src_lr = lrs.get((start, model, SCRATCH, "all"))
            source = runs / budget_key(config, "full", start, model, SCRATCH, None, math.inf, 0, src_lr or 0) / \
                "final.safetensors"
            if src_lr is None or not source.exists():
                print(f"    {k} skipped: no noise-free {start} run of {model} to start from (run --datasets "
                      f"{start})", file=sys.stderr)
                return None
        if args.limit is not None and ran[0] >= args.limit:
            raise _Limit
        base = {**COMMON, **cfg["recipes"][dataset], "lr": lr}
        if args.steps:
            base["steps"] = args.steps
        delta, full_b = DATASETS[dataset]["delta"], base["batch_size"]
        recipe, target = dict(base), eps
        if stage == "search":  # TAN: the same S and sigma / B at a smaller batch; spends far more than eps
            n = train_size(dataset, args.data_dir)
            sigma = calibrate_sigma(eps, delta, min(1.0, full_b / n), base["steps"], "rdp")
            sim = tan.scale_down(full_b, sigma, base["steps"], max(1, full_b // search["shrink"]))
            recipe["batch_size"] = sim["batch_size"]
            recipe["physical_batch_size"] = min(base["physical_batch_size"], sim["batch_size"])
            target = compute_epsilon([(sim["sigma"], min(1.0, sim["batch_size"] / n), base["steps"])], delta, "rdp")
        margs = budget_args(model, cfg["model_args"])
        ran[0] += 1
        print(f"{k} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        common = dict(epsilon=target, delta=delta, seed=seed, data_dir=args.data_dir, out_dir=runs / k, resume=True,
                      progress=False, device=args.device, **recipe)
        if start == SCRATCH:
            result = zoo.train(model, dataset=dataset, model_args=margs, **common)
        else:
            result = zoo.finetune(str(source), dataset, trainable=trainable, **common)
        row = budget_row(config, stage, dataset, model, start, trainable, margs, eps, delta, seed, full_b, recipe,
                         result, t0)
        done.add(k)
        record(rows, row, csv_path, BUDGET_FIELDS, redraw,
               summary=f"    Dice {row['dice']:.3f}, epsilon {row['epsilon_spent']:.2f}, sigma {row['sigma']:.2f}, "
                       f"{row['s_per_step']} s/step")
        return row

    lrs: dict = {}
    epsilons = args.epsilons or cfg["epsilons"]
    deciding_eps = [e for e in epsilons if e == search["epsilon"]]  # first: the releases and the ranking need it

    def full(dataset, start, trainable, eps_list):
        for model in models:
            lr = lrs.get((dataset, model, start, trainable or "all"))
            for eps in eps_list if lr is not None else []:
                for seed in cfg["seeds"]:
                    go("full", dataset, model, start, trainable, eps, seed, lr)

    try:
        for dataset in datasets:
            for start, trainable in variants(dataset, cfg):
                for model in models:
                    key = (dataset, model, start, trainable or "all")
                    while (lr := next_search_lr(search["lrs"], search_scores(rows, config).get(key, {}),
                                                search.get("extend", 0))) is not None:
                        if go("search", dataset, model, start, trainable, search["epsilon"], search["seed"],
                              lr) is None:
                            break  # skipped (no source to start from): nothing more to learn for this variant
                lrs.update(chosen_lrs(rows, config))
                full(dataset, start, trainable, deciding_eps)
            for model, start, trainable in deciding(rows, config, dataset, search["epsilon"], cfg["decide_top"],
                                                    cfg["seeds"][0], lrs):
                spec = None if trainable == "all" else trainable
                for seed in cfg["decide_seeds"]:
                    go("full", dataset, model, start, spec, search["epsilon"], seed,
                       lrs[dataset, model, start, trainable])
            for start, trainable in variants(dataset, cfg):
                full(dataset, start, trainable, [e for e in epsilons if e not in deciding_eps])
    except _Limit:
        pass
    return close(rows, csv_path, out / "dice_vs_epsilon.png", redraw)


class _Limit(Exception):
    """``--limit`` new runs are done."""


def _label(r: dict) -> str:
    return r["model"] if r["start"] == SCRATCH else f"{r['model']} from {r['start']} ({r['trainable']})"


def budget_table(rows: list[dict], config: str, trivial: dict[str, float], sizes: dict[str, int]) -> str:
    cfg = CONFIGS[config]
    full = [r for r in rows if r["stage"] == "full"]
    epsilons = sorted({float(r["epsilon"]) for r in full}, reverse=True)
    finite = [e for e in epsilons if not math.isinf(e)]
    lines = [f"### Segmentation under DP at one budget per data set: `{config}` configuration", "",
             f"From `eval/study_segmentation.py --config {config}` (settings in its docstring). Foreground Dice on the "
             "test split, mean ± std (seeds) of full runs at the lr that TAN's simulation chose at ε = "
             f"{cfg['search']['epsilon']:g} (B / {cfg['search']['shrink']}, same S and σ/B); ε = ∞: the same recipe "
             "with σ = 0. Every architecture at the same arguments "
             f"({', '.join(f'{k} {v}' for k, v in cfg['model_args'].items())}, where its family takes them) and the "
             "same budget (views × pixels). Noise / signal: √(trained params) · σ / (B √S) "
             "(`zoo.dp.tan.noise_to_signal`). s / step: training wall time per step on 2 CPU cores (x86_64), the "
             "median over the network's full runs (a run slowed by other work on the machine does not move it); "
             "per-sample gradients: MiB per micro-batch.", ""]
    for dataset in sorted({r["dataset"] for r in full}):
        here = [r for r in full if r["dataset"] == dataset]
        one = here[0]
        lines += [f"**{dataset}** (N = {sizes[dataset]} training images, δ = {one['delta']}, RDP; "
                  f"B = {one['full_batch_size']}, S = {one['steps']}, "
                  f"{int(float(one['view_pixels'])) / 1e6:.1f} M view-pixels per run; predicting foreground everywhere "
                  f"scores {trivial[dataset]:.3f})", "",
                  "| model | params (trained) | per-sample grads MiB | s / step | lr | noise / signal at ε = "
                  + ", ".join(f"{e:g}" for e in finite) + " | "
                  + " | ".join(f"ε = {_eps_label(e)}" for e in epsilons) + " |",
                  "|---|---:|---:|---:|---:|---|" + "---:|" * len(epsilons)]
        groups: dict = {}
        for r in here:
            groups.setdefault(_label(r), []).append(r)
        means = {}
        for label, rs in sorted(groups.items()):
            cells = []
            for e in epsilons:
                vals = [float(r["dice"]) for r in rs if float(r["epsilon"]) == e]
                cells.append(mean_std(vals, 3) + (f" ({len(vals)})" if len(vals) > 1 else "") if vals else "—")
                if e == cfg["search"]["epsilon"] and vals:
                    means[label] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                    len(vals))
            ratios = [_noise_to_signal(rs, e, params="trained_params") for e in finite]
            per_step = statistics.median(float(r["s_per_step"]) for r in rs)
            lines.append(f"| `{label}` | {int(rs[0]['params']):,} ({int(rs[0]['trained_params']):,}) | "
                         f"{float(rs[0]['psg_mib']):.1f} | {per_step:.2f} | "
                         f"{float(rs[0]['lr']):g} | {', '.join(ratios)} | " + " | ".join(cells) + " |")
        if means:
            best = max(means, key=lambda k: means[k][0])
            m, sd, n = means[best]
            close_ = [k for k in means if k != best and means[k][0] >= m - max(sd, 0.02)]
            lines += ["", f"Best at ε = {cfg['search']['epsilon']:g}: `{best}` ({m:.3f}, {n} seed{'s' * (n > 1)}); "
                      f"within max(its std, 0.02) of it: " + (", ".join(f"`{k}` ({means[k][0]:.3f})" for k in close_)
                                                              or "none") + "."]
        lines.append("")
    for dataset in sorted({r["dataset"] for r in rows if r["stage"] == "search"}):
        lines += search_table(rows, config, dataset)
    return "\n".join(lines)


def search_table(rows: list[dict], config: str, dataset: str) -> list[str]:
    """The search stage of ``dataset``: each variant's simulated Dice by lr (mean over the search seeds), the lr
    that the full runs take in bold."""
    here = [r for r in rows if r["config"] == config and r["stage"] == "search" and r["dataset"] == dataset]
    lrs, one, chosen = sorted({float(r["lr"]) for r in here}), here[0], chosen_lrs(rows, config)
    lines = [f"TAN's simulation on **{dataset}** (B = {one['batch_size']} of {one['full_batch_size']}, "
             f"S = {one['steps']}, the same σ/B: ε spent {float(one['epsilon_spent']):.2f} for ε = "
             f"{float(one['epsilon']):g}): foreground Dice by lr, the chosen lr in bold.", "",
             "| model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    groups: dict = {}
    for r in here:
        groups.setdefault((r["model"], r["start"], r["trainable"]), []).append(r)
    for (model, start, trainable), rs in sorted(groups.items()):
        cells = []
        for lr in lrs:
            vals = [float(r["dice"]) for r in rs if float(r["lr"]) == lr]
            cell = f"{statistics.fmean(vals):.3f}" if vals else "—"
            cells.append(f"**{cell}**" if vals and chosen.get((dataset, model, start, trainable)) == lr else cell)
        lines.append(f"| `{_label(rs[0])}` | " + " | ".join(cells) + " |")
    return lines + [""]


def budget_report(rows: list[dict], out: Path, config: str, data_dir) -> None:
    full = [r for r in rows if r["stage"] == "full"]
    trivial = {d: all_foreground_dice(d, CONFIGS[config]["recipes"][d]["resize"], data_dir)
               for d in sorted({r["dataset"] for r in rows})}
    if full:
        plot([{**r, "model": _label(r)} for r in full], out / "dice_vs_epsilon.png", trivial)
    sizes = {d: train_size(d, data_dir) for d in trivial}
    write_text(out / "results.md", budget_table(rows, config, trivial, sizes) + "\n")


def main() -> int:
    ap = study_parser(__doc__, "segmentation", CONFIGS)
    ap.add_argument("--models", nargs="+", help="subset of the architectures (default: all registered)")
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    ap.add_argument("--epsilons", nargs="+", type=float,
                    help=f"default: the config's ({EPSILONS} for cpu and gpu)")
    ap.add_argument("--limit", type=int, help="stop after this many new runs (smoke tests)")
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    out, runs, csv_path, rows = study_dirs("segmentation", args.config, args.out, args.runs)
    if "search" in cfg:  # a budget configuration
        return run_budget(args, cfg, out, runs, csv_path, rows)
    redraw = lambda rs: report(rs, out, args.config, args.data_dir)  # noqa: E731
    done = {key(r["config"], r["dataset"], r["model"], float(r["epsilon"]), int(r["seed"])) for r in rows}
    models = args.models or segmentation_models()
    grid = [(d, m, e, s) for d in args.datasets for m in models for e in args.epsilons or EPSILONS
            for s in cfg["seeds"]]
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
