"""Study: a user's small, imbalanced data set given by path, trained with the recipe zoo chooses for it.

The situation of issue 16: a few hundred private images, of which the project has never seen one. Such data
stands in here as a stratified random subset of PneumoniaMNIST's training split (``--n`` images, 546 by default:
the size of MedMNIST's BreastMNIST; about 26 % normal, 74 % pneumonia), written as a MedMNIST-style ``.npz`` with
the full 624-image test split. The study trains on it through a path, as a user would (``zoo.train(model,
dataset=PATH, epsilon=E)``, nothing else given): delta, batch size, steps and K are chosen for N and epsilon by
:mod:`zoo.training.auto_recipe`. The cards' own recipes do not even apply here: they sample batches of 2,048 and 1,024
from the 4,708 training X-rays, more than the 546 images there are.

Every row records the majority-class baseline and whether the run was flagged as degenerate (constant predictions,
or balanced accuracy no better than chance): the honest reading of a score on such data.
Grid: ScatterNet + linear at epsilon 8, 3, 1 with seeds 0, 1, 2; ScatterNet + CNN (4x the cost per sample) at the
same epsilons with seed 0. Reproduce (2 CPU cores, about 12 minutes):  python eval/study_own_data.py
Writes ``eval/results/own-data-small/`` (CSV, ``results.md``; included in MODEL_CARD.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import zoo
from _results import METRICS, classification_fields, close, mean_std, record, report, study_dirs
from zoo.data import data_root

GRID = {"scatternet-linear-pneumonia": [0, 1, 2], "scatternet-cnn-pneumonia": [0]}  # model -> seeds
EPSILONS = [8.0, 3.0, 1.0]
FIELDS = ["model", "n", "epsilon", "delta", "batch_size", "steps", "seed", "sigma", "epsilon_spent",
          *METRICS, "baseline_accuracy", "degenerate", "train_time_s"]


def write_subset(n: int, out: Path, data_dir=None) -> Path:
    """A stratified ``n``-image subset of PneumoniaMNIST's train split (seed 0) and its full test split, as a
    MedMNIST-style ``.npz`` at ``out`` (written once)."""
    if out.exists():
        return out
    with np.load(data_root(data_dir) / "pneumonia" / "pneumoniamnist.npz", allow_pickle=False) as z:
        x, y = z["train_images"], z["train_labels"].reshape(-1)
        rng = np.random.default_rng(0)
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), round(n * np.mean(y == c)), replace=False)
                                      for c in (0, 1)]))
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, train_images=x[idx], train_labels=y[idx], test_images=z["test_images"],
                 test_labels=z["test_labels"].reshape(-1))
    return out


def table(rows: list[dict], config: str) -> str:
    n = rows[0]["n"] if rows else "?"
    lines = ["### Your own small data set, by path, with the recipe zoo chooses", "",
             f"From `eval/study_own_data.py` (settings in its docstring): {n} training images of PneumoniaMNIST "
             "(stratified, about 26 % normal) given as a `.npz` path with only ε set; δ, B, S and K chosen by "
             "`zoo.training.auto_recipe`; the full 624-image test split (majority-class baseline: accuracy 0.625, balanced "
             "accuracy 0.5, ROC-AUC 0.5). Cells: mean ± std over the seeds (public: measurements); \"degenerate\" "
             "counts the runs flagged for constant predictions or a balanced accuracy no better than chance.", "",
             "| model | ε | δ | B | S | σ | seeds | " + " | ".join(f"test {m.replace('_', ' ')}" for m in METRICS)
             + " | degenerate | train s |", "|---|---|---|---|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for model in GRID:
        for eps in EPSILONS:
            rs = [r for r in rows if r["model"] == model and float(r["epsilon"]) == eps]
            if not rs:
                continue
            cells = [mean_std((r[m] for r in rs), 3) for m in METRICS]
            bad = sum(str(r["degenerate"]) == "True" for r in rs)
            lines.append(f"| `{model}` | {eps:g} | {float(rs[0]['delta']):g} | {rs[0]['batch_size']} | "
                         f"{rs[0]['steps']} | {float(rs[0]['sigma']):.2f} | {len(rs)} | " + " | ".join(cells)
                         + f" | {bad} of {len(rs)} | "
                         f"{statistics.fmean(float(r['train_time_s']) for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=546)
    ap.add_argument("--data-dir")
    ap.add_argument("--out")
    ap.add_argument("--runs")
    args = ap.parse_args()
    out, runs, csv_path, rows = study_dirs("own-data", "small", args.out, args.runs)
    data = write_subset(args.n, runs / f"pneumonia-subset-{args.n}.npz", args.data_dir)
    redraw = lambda rs: report(rs, out, "small", lambda rows, path: None, table, "none")  # noqa: E731
    done = {(r["model"], float(r["epsilon"]), int(r["seed"])) for r in rows}
    for model, seeds in GRID.items():
        for eps in EPSILONS:
            for seed in seeds:
                if (model, eps, seed) in done:
                    continue
                print(f"{model}, epsilon {eps:g}, seed {seed} ...", file=sys.stderr, flush=True)
                t0 = time.time()
                result = zoo.train(model, dataset=str(data), epsilon=eps, seed=seed,
                                   out_dir=runs / f"{model}-eps{eps:g}-seed{seed}", resume=True, progress=False)
                test, ledger = result["test"], result["ledger"]
                row = {"model": model, "n": ledger["num_samples"], "epsilon": eps,
                       "delta": ledger["delta"], "batch_size": result["recipe"]["batch_size"],
                       "steps": ledger["steps"], "seed": seed, **classification_fields(result, t0),
                       "baseline_accuracy": test["baseline"]["accuracy"], "degenerate": test["degenerate"]}
                record(rows, row, csv_path, FIELDS, redraw,
                       summary=f"    balanced accuracy {test['balanced_accuracy']:.3f}, degenerate "
                               f"{test['degenerate']}, {row['train_time_s']} s")
    return close(rows, csv_path, out / "results.md", redraw)


if __name__ == "__main__":
    sys.exit(main())
