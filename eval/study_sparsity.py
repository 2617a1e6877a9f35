"""Study: accuracy of L0-sparse WideResNets under DP against sparsity strength and privacy budget.

Grid: data set (CIFAR-10, PneumoniaMNIST) x ``l0_lambda`` (Louizos et al.'s lambda: the price of a kept parameter
against the mean loss of one sample, over N; :mod:`zoo.nn.sparse`) x epsilon. Each run
trains with ``zoo.train`` (DP-SGD, RDP accountant, delta 1e-5), prunes the EMA model with ``zoo.prune`` and
appends one row to ``<out>/results.csv``: test accuracy of the EMA model (the pruned network has the same
outputs, see tests/test_sparse.py), the fraction of channel gates left open, the residual branches left open (when branch gates are used), parameters and FLOPs before and after pruning, sigma, batch size, steps, time.
Resumable: finished rows are skipped and an interrupted run resumes from its last checkpoint
(``<out>/runs/<key>``). ``<out>/accuracy_vs_sparsity.png`` is redrawn after every run.

Configurations:
  cpu  ``test-wrn10-1-l0``, batch 256, 30 steps, CIFAR-10 on a 5,000-image subset (1,000 test images), all
       of PneumoniaMNIST (624 test images): a few minutes on 2 cores. Small and short: it checks the pipeline and shows trends,
       not the accuracy of the recipe.
  gpu  ``wrn16-4-l0`` with the batch size, sigma and steps that TAN proposes for each (epsilon, N)
       (``zoo.privacy.tan.propose``), augmentation multiplicity 16, the full data sets.
Reproduce:  python eval/study_sparsity.py --config cpu --out runs/study-cpu
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import zoo
from _fixtures import register_fixture_models
from _results import append_row, read_rows
from zoo.privacy import tan
from zoo.nn.sparse import HardConcreteGate

CONFIGS = {
    "cpu": {"model": "test-wrn10-1-l0", "l0_lambdas": [0.0, 0.1, 1.0, 10.0], "epsilons": [2.0, 8.0],
            "datasets": {"cifar10": ({"train_subset": 5000}, 1000), "pneumoniamnist": ({}, None)},
            "recipe": {"batch_size": 256, "physical_batch_size": 128, "steps": 30, "augmult": 1, "lr": 2.0},
            "tan": False},
    "gpu": {"model": "wrn16-4-l0", "l0_lambdas": [0.0, 0.001, 0.01, 0.1], "epsilons": [1.0, 3.0, 8.0],
            "datasets": {"cifar10": ({}, None), "pneumoniamnist": ({}, None)},  # (recipe overrides, test subset)
            "recipe": {"physical_batch_size": 256, "augmult": 16}, "tan": True},
}
DATASET_SIZES = {"cifar10": 50_000, "pneumoniamnist": 4_708}
DELTA = 1e-5
FIELDS = ["config", "dataset", "model", "epsilon", "delta", "l0_lambda", "batch_size", "sigma", "steps",
          "epsilon_spent", "accuracy", "open_fraction", "branches_open", "params", "params_pruned", "flops", "flops_pruned",
          "train_time_s"]


def key(row: dict) -> str:
    return f"{row['config']}-{row['dataset']}-eps{row['epsilon']:g}-l0lambda{row['l0_lambda']:g}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, dataset in zip(axes, sorted(DATASET_SIZES)):
        for eps in sorted({float(r["epsilon"]) for r in rows}):
            pts = sorted((float(r["open_fraction"]), float(r["accuracy"])) for r in rows
                         if r["dataset"] == dataset and float(r["epsilon"]) == eps)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"ε = {eps:g}")
        ax.set(title=dataset, xlabel="fraction of channel gates open (1 = dense)", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--out", default="runs/study-sparsity")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="override the steps of every run (smoke tests)")
    ap.add_argument("--limit", type=int, help="stop after this many new runs (smoke tests)")
    args = ap.parse_args()
    cfg, out = CONFIGS[args.config], Path(args.out)
    register_fixture_models()  # the cpu config trains the test suite's tiny L0 WRN (tests/models)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    rows = read_rows(table)
    done = {key({**r, "epsilon": float(r["epsilon"]), "l0_lambda": float(r["l0_lambda"])}) for r in rows}
    grid = [(d, e, w) for d in cfg["datasets"] for e in cfg["epsilons"] for w in cfg["l0_lambdas"]]
    ran = 0
    for i, (dataset, eps, weight) in enumerate(grid, 1):
        row = {"config": args.config, "dataset": dataset, "model": cfg["model"], "epsilon": eps, "delta": DELTA,
               "l0_lambda": weight}
        if key(row) in done:
            print(f"[{i}/{len(grid)}] {key(row)}: done, skipped", file=sys.stderr)
            continue
        if args.limit is not None and ran >= args.limit:
            break
        ran += 1
        data_recipe, test_subset = cfg["datasets"][dataset]
        recipe = {**cfg["recipe"], **data_recipe}
        if cfg["tan"]:
            p = tan.propose(eps, DELTA, DATASET_SIZES[dataset])
            recipe.update(batch_size=p["batch_size"], steps=p["steps"])
        if args.steps:
            recipe["steps"] = args.steps
        print(f"[{i}/{len(grid)}] {key(row)} ...", file=sys.stderr, flush=True)
        t0 = time.time()
        result = zoo.train(cfg["model"], dataset=dataset, epsilon=eps, delta=DELTA, seed=args.seed,
                           data_dir=args.data_dir, out_dir=out / "runs" / key(row), resume=True,
                           test_subset=test_subset, progress=False, model_args={"l0_lambda": weight},
                           **recipe)
        model = result["model_object"]
        gates = [m for m in model.modules() if isinstance(m, HardConcreteGate) and m.log_alpha.numel() > 1]
        branches = [m for m in model.modules() if isinstance(m, HardConcreteGate) and m.log_alpha.numel() == 1]
        open_gates = sum(int((g.eval().gates()[0] > 0).sum()) for g in gates)
        small, report = zoo.prune(model, input_size=model_input(dataset))
        ledger = result["ledger"]
        row.update(batch_size=recipe["batch_size"], sigma=ledger["noise_multiplier"], steps=ledger["steps"],
                   epsilon_spent=ledger["epsilon"], accuracy=result["test"]["accuracy"],
                   open_fraction=open_gates / sum(g.log_alpha.numel() for g in gates),
                   branches_open=f"{sum(int(b.eval().gates()[0, 0] > 0) for b in branches)}/{len(branches)}",
                   params=report["params_before"], params_pruned=report["params_after"],
                   flops=report["flops_before"], flops_pruned=report["flops_after"],
                   train_time_s=round(time.time() - t0, 1))
        rows.append(row)
        append_row(table, FIELDS, row)
        plot(rows, out / "accuracy_vs_sparsity.png")
        print(f"    accuracy {row['accuracy']:.3f}, open {row['open_fraction']:.2f}, "
              f"params {row['params']:,} -> {row['params_pruned']:,}", file=sys.stderr)
    print(f"{len(rows)} rows in {table}; plot: {out / 'accuracy_vs_sparsity.png'}")
    return 0


def model_input(dataset: str) -> tuple[int, ...]:
    from zoo.data import get_dataset_info

    return get_dataset_info(dataset).image_size


if __name__ == "__main__":
    sys.exit(main())
