"""Results tables shared by the resumable studies in eval/: one CSV row per finished run, appended at once."""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

METRICS = ["accuracy", "balanced_accuracy", "roc_auc"]  # what the classification studies record
LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC-AUC"}


def read_rows(path: Path) -> list[dict]:
    """The rows of ``path`` (none when it does not exist yet)."""
    return list(csv.DictReader(path.open())) if path.exists() else []


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """Append ``row`` to ``path`` (with the header when the file is new); a finished run is never rewritten."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def study_dirs(name: str, config: str, out: str | None, runs: str | None) -> tuple[Path, Path, Path, list[dict]]:
    """``(results folder, checkpoints folder, CSV path, finished rows)`` of study ``name`` in ``config``: by default
    ``eval/results/<name>-<config>`` and ``runs/study-<name>-<config>``."""
    results = Path(out or Path(__file__).parent / "results" / f"{name}-{config}")
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / "results.csv"
    return results, Path(runs or Path("runs") / f"study-{name}-{config}"), csv_path, read_rows(csv_path)


def finished_run(out: Path) -> dict | None:
    """The result of the complete run in ``out`` (its ``result.json``, with ``model_object`` loaded from its verified
    ``final`` checkpoint), or None when it is not complete: a run whose row was not written (the study stopped
    between the run's end and its row) is read back, not trained again."""
    import json

    if not ((out / "final.json").exists() and (out / "result.json").exists()):
        return None
    from zoo.catalog.registry import load_checkpoint

    result = json.loads((out / "result.json").read_text())
    result["model_object"] = load_checkpoint(out / "final.safetensors")[0]
    print(f"    {out} is complete: reading its result", file=sys.stderr, flush=True)
    return result


def record(rows: list[dict], row: dict, csv_path: Path, fields: list[str], redraw, summary: str = "") -> None:
    """Keep a finished run: append ``row`` to the CSV at once, ``redraw(rows)`` the plot and table, and print the
    run's ``summary`` line to stderr."""
    rows.append(row)
    append_row(csv_path, fields, row)
    redraw(rows)
    if summary:
        print(summary, file=sys.stderr, flush=True)


def classification_summary(result: dict, seconds: float) -> str:
    """One progress line for a finished classification run."""
    test, ledger = result["test"], result["ledger"]
    return ("    " + ", ".join(f"{m} {test[m]:.3f}" for m in METRICS)
            + f"; epsilon {ledger['epsilon']:.2f}, sigma {ledger['noise_multiplier']:.2f}, {seconds} s")


def study_parser(doc: str, name: str, configs) -> argparse.ArgumentParser:
    """The arguments every study takes: ``--config --out --runs --data-dir --steps --device``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--config", choices=sorted(configs), default="cpu")
    ap.add_argument("--out", help=f"CSV, plot and table (default eval/results/{name}-<config>)")
    ap.add_argument("--runs", help=f"checkpoints of each run (default runs/study-{name}-<config>)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--steps", type=int, help="override the steps of every run (smoke tests)")
    ap.add_argument("--device", default=None)
    return ap


def mean_std(values, digits: int = 4) -> str:
    """A table cell: the mean of ``values``, with `` ± `` their standard deviation when there are two or more."""
    vals = [float(v) for v in values]
    return f"{statistics.fmean(vals):.{digits}f}" + (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "")


def classification_fields(result: dict, started: float) -> dict:
    """The columns every classification study records from a ``zoo.train``/``zoo.finetune`` result."""
    test, ledger = result["test"], result["ledger"]
    return {"steps": ledger["steps"], "sigma": ledger["noise_multiplier"], "epsilon_spent": ledger["epsilon"],
            **{m: test[m] for m in METRICS},
            "train_time_s": round(time.time() - started, 1)}


def report(rows: list[dict], out: Path, config: str, plot, table, plot_name: str) -> None:
    """Redraw ``out/plot_name`` with ``plot(rows, path)`` and rewrite ``out/results.md`` (included in MODEL_CARD.md)
    with ``table(rows, config)``."""
    from zoo.io import write_text

    plot(rows, out / plot_name)
    write_text(out / "results.md", table(rows, config))


def close(rows: list[dict], csv_path: Path, plot_path: Path, redraw) -> int:
    """End of a study: ``redraw(rows)`` (also after a run that had nothing left to do), say where it all is."""
    if rows:
        redraw(rows)
    print(f"{len(rows)} rows in {csv_path}; plot {plot_path}; table {csv_path.parent / 'results.md'}")
    return 0
