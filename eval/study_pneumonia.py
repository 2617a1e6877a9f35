"""Study: private pediatric pneumonia classification, plain vs equivariant, from scratch vs fine-tuned from CIFAR-10.

Grid: model (``wrn16-1-pneumonia``, plain; ``eq-resnet9-c4-pneumonia``, C4-equivariant; both about 0.17M
parameters) x epsilon (8, 3, 1; delta = 1e-4 < 1/N, RDP) x start (``scratch``: ``zoo.train`` of the card;
``cifar10``: ``zoo.finetune`` of a checkpoint of the same architecture trained privately on CIFAR-10, head reset
to two classes, grayscale X-rays repeated to its 3 input channels) x seed. Both starts use the same recipe, so
they spend the same epsilon on PneumoniaMNIST. The CIFAR-10 ledger is another data set's: it stays the fine-tuned
checkpoint's ``parent`` and does not compose with the pneumonia budget.
Data: PneumoniaMNIST's shipped split (train 1,214 normal / 3,494 pneumonia; test 234 / 390): accuracy alone
flatters the majority class (0.625 for "always pneumonia"), so balanced accuracy and ROC-AUC are reported too.

Each run appends one row to ``<out>/results.csv``; ``metrics_vs_epsilon.png`` and ``results.md`` (included in
MODEL_CARD.md) are redrawn after each. Resumable: finished rows are skipped, interrupted runs resume.

Configurations:
  cpu  CIFAR-10 pre-training at epsilon 8 (delta 1e-5, B=512, 60 steps); pneumonia B=128 (q=0.027), 60 steps,
       K=1; one seed. About 20 minutes on 2 cores: it checks the pipeline and shows first trends.
  release  the CPU release tier (issue 15): wrn16-1-pneumonia from scratch vs fine-tuned from the published
       non-private CIFAR-10 checkpoint ``wrn16-1.nonprivate_cifar10`` (``public``: CIFAR-10 is public data with
       respect to chest X-rays; the ledger records it as such); B=256 (q=0.054), 200 steps (51,200 samples, about
       11 epochs), K=1, lr 2, EMA 0.99; 3 seeds. About 2.5 minutes per run on an idle 2-core CPU.
  gpu  the cards' recipes (B=512, 400 steps, K=4); CIFAR-10 pre-training at epsilon 8 with B=4096, 500 steps, K=4
       (both architectures alike); 3 seeds.
Reproduce:  python eval/study_pneumonia.py --config cpu
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import zoo
from _results import (LABELS, METRICS, classification_fields, classification_summary, close, record, report,
                      study_dirs, study_parser)

MODELS = {"wrn16-1-pneumonia": "wrn16-1", "eq-resnet9-c4-pneumonia": "eq-resnet9-c4"}  # card -> CIFAR-10 base
EPSILONS = [8.0, 3.0, 1.0]
STARTS = ["scratch", "cifar10", "public"]
CONFIGS = {
    "cpu": {"seeds": [0],
            "pretrain": {"epsilon": 8.0, "delta": 1e-5, "batch_size": 512, "physical_batch_size": 256, "steps": 60,
                         "augmult": 1, "clip_norm": 1.0, "lr": 2.0, "momentum": 0.0, "ema_decay": 0.99},
            "recipe": {"batch_size": 128, "physical_batch_size": 128, "steps": 60, "augmult": 1, "ema_decay": 0.99}},
    "release": {"seeds": [0, 1, 2], "models": ["wrn16-1-pneumonia"], "starts": ["scratch", "public"],
                "public_backbone": "wrn16-1.nonprivate_cifar10",
                "recipe": {"batch_size": 256, "physical_batch_size": 128, "steps": 200, "augmult": 1, "lr": 2.0,
                           "ema_decay": 0.99}},
    "gpu": {"seeds": [0, 1, 2],
            "pretrain": {"epsilon": 8.0, "delta": 1e-5, "batch_size": 4096, "physical_batch_size": 256,
                         "steps": 500, "augmult": 4, "clip_norm": 1.0, "lr": 2.0, "momentum": 0.0,
                         "ema_decay": 0.999},
            "recipe": {}},  # the pneumonia cards' recipes
}
PLOT = "metrics_vs_epsilon.png"
BUDGETS = {"release": "Budget per run: 51,200 samples (B=256, 200 steps, K=1), about 145 s of training on 2 CPU cores "
                      "(x86_64, torch 2.14.1; measured with other work on the machine); seeds 0, 1, 2 (public: "
                      "measurements, not releases)."}
FIELDS = ["config", "model", "start", "epsilon", "delta", "seed", "batch_size", "steps", "sigma", "epsilon_spent",
          *METRICS, "train_time_s", "pretrain_epsilon", "pretrain_accuracy"]


def key(config, model, start, epsilon, seed) -> str:
    return f"{config}-{model}-{start}-eps{epsilon:g}-seed{seed}"


def pretrain(base: str, cfg: dict, runs: Path, seed: int, data_dir, device) -> tuple[Path, dict]:
    """The CIFAR-10 checkpoint of ``base`` (trained privately once per seed; resumed if interrupted)."""
    out = runs / f"pretrain-{base}-seed{seed}"
    final = out / "final.safetensors"
    if not final.exists():
        print(f"    pre-training {base} on CIFAR-10 ...", file=sys.stderr, flush=True)
        zoo.train(base, dataset="cifar10", seed=seed, data_dir=data_dir, out_dir=out, resume=True, progress=False,
                  device=device, **cfg["pretrain"])
    import json
    result = json.loads((out / "result.json").read_text())
    return final, result


def card_recipe(model: str) -> dict:
    """The pneumonia card's recipe as fine-tuning overrides, so that every start trains alike."""
    return {k: v for k, v in zoo.model_info(model)["recipe"].items()
            if k not in ("dataset", "epsilon", "delta", "source")}


def _summary(rows, model, start, metric):
    """``[(epsilon, mean, std, n)]`` over seeds."""
    out = []
    for eps in sorted({float(r["epsilon"]) for r in rows}):
        vals = [float(r[metric]) for r in rows if r["model"] == model and r["start"] == start
                and float(r["epsilon"]) == eps]
        if vals:
            out.append((eps, statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for model in sorted({r["model"] for r in rows}):
            for start in STARTS:
                pts = _summary(rows, model, start, metric)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                capsize=3, linestyle="-" if start == "scratch" else "--", label=f"{model}, {start}")
        ax.set_xscale("log")
        eps = sorted({float(r["epsilon"]) for r in rows})
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
        ax.set(title=f"PneumoniaMNIST test: {LABELS[metric]}", xlabel="ε (δ = 1e-4, RDP)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], config: str) -> str:
    epsilons = sorted({float(r["epsilon"]) for r in rows}, reverse=True)
    pre = {r["model"]: (r["pretrain_epsilon"], r["pretrain_accuracy"]) for r in rows if r["start"] == "cifar10"}
    lines = [f"### Private pneumonia classification: `{config}` configuration", "",
             f"PneumoniaMNIST test split (234 normal / 390 pneumonia; \"always pneumonia\" scores accuracy 0.625, "
             f"balanced accuracy 0.5, ROC-AUC 0.5), from `eval/study_pneumonia.py --config {config}` (settings in "
             "its docstring). Cells: accuracy / balanced accuracy / ROC-AUC (mean ± std over seeds). "
             + (BUDGETS[config] + " " if config in BUDGETS else "")
             + "`public`: `zoo finetune` of the published non-private CIFAR-10 checkpoint `wrn16-1.nonprivate_cifar10` "
             "(CIFAR-10 is public data with respect to chest X-rays; the ledger records it under `pretraining`). "
             "`cifar10`: `zoo finetune` of a checkpoint trained privately on CIFAR-10"
             + (" (" + "; ".join(f"{m}: ε = {float(e):.2f}, CIFAR-10 test accuracy {float(a):.3f}"
                                for m, (e, a) in sorted(pre.items())) + ")" if pre else "") + ".", "",
             "| model | start | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " |",
             "|---|---|" + "---|" * len(epsilons)]
    for model in sorted({r["model"] for r in rows}):
        for start in STARTS:
            per = {m: {e: v for e, v, _, _ in _summary(rows, model, start, m)} for m in METRICS}
            if not per["accuracy"]:
                continue
            sd = {m: {e: (s, n) for e, _, s, n in _summary(rows, model, start, m)} for m in METRICS}
            cells = [" / ".join(f"{per[m][e]:.3f}" + (f" ± {sd[m][e][0]:.3f}" if sd[m][e][1] > 1 else "")
                                for m in METRICS) if e in per["accuracy"] else "—" for e in epsilons]
            lines.append(f"| `{model}` | {start} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = study_parser(__doc__, "pneumonia", CONFIGS)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS))
    ap.add_argument("--epsilons", nargs="+", type=float, default=EPSILONS)
    ap.add_argument("--starts", nargs="+", choices=STARTS)
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    args.models = args.models or cfg.get("models", sorted(MODELS))
    args.starts = args.starts or cfg.get("starts", ["scratch", "cifar10"])
    if args.steps:
        cfg = {**cfg, "pretrain": {**cfg["pretrain"], "steps": args.steps},
               "recipe": {**cfg["recipe"], "steps": args.steps}}
    out, runs, csv_path, rows = study_dirs("pneumonia", args.config, args.out, args.runs)
    redraw = lambda rs: report(rs, out, args.config, plot, table, PLOT)  # noqa: E731
    done = {key(r["config"], r["model"], r["start"], float(r["epsilon"]), int(r["seed"])) for r in rows}
    grid = [(m, s, e, seed) for m in args.models for s in args.starts for e in args.epsilons for seed in cfg["seeds"]]
    for i, (model, start, eps, seed) in enumerate(grid, 1):
        k = key(args.config, model, start, eps, seed)
        if k in done:
            continue
        print(f"[{i}/{len(grid)}] {k} ...", file=sys.stderr, flush=True)
        delta = zoo.model_info(model)["recipe"]["delta"]
        common = dict(seed=seed, data_dir=args.data_dir, out_dir=runs / k, resume=True, progress=False,
                      device=args.device, **cfg["recipe"])
        t0 = time.time()
        pre_eps = pre_acc = ""
        if start == "scratch":
            result = zoo.train(model, epsilon=eps, delta=delta, **common)
        elif start == "public":  # the published non-private CIFAR-10 checkpoint: no privacy cost on the X-rays
            pre = zoo.model_info(cfg["public_backbone"])["pretrained"][cfg["public_backbone"]]
            pre_eps, pre_acc = "inf", pre["metrics"].get("accuracy", "")
            result = zoo.finetune(cfg["public_backbone"], "pneumoniamnist", eps, delta,
                                  **{**card_recipe(model), **common})
        else:
            checkpoint, pre = pretrain(MODELS[model], cfg, runs, seed, args.data_dir, args.device)
            pre_eps, pre_acc = pre["ledger"]["epsilon"], pre["test"]["accuracy"]
            t0 = time.time()
            result = zoo.finetune(checkpoint, "pneumoniamnist", eps, delta, **{**card_recipe(model), **common})
        row = {"config": args.config, "model": model, "start": start, "epsilon": eps, "delta": delta, "seed": seed,
               "batch_size": result["recipe"]["batch_size"], **classification_fields(result, t0),
               "pretrain_epsilon": pre_eps, "pretrain_accuracy": pre_acc}
        record(rows, row, csv_path, FIELDS, redraw, summary=classification_summary(result, row["train_time_s"]))
    return close(rows, csv_path, out / PLOT, redraw)


if __name__ == "__main__":
    sys.exit(main())
