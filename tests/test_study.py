"""The sparsity study pipeline (eval/study_sparsity.py) end to end on real data, at smoke-test size."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "study_sparsity.py"


def run(out: Path, data_dir: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--config", "cpu", "--out", str(out), "--data-dir",
                           str(data_dir), "--steps", "2", "--limit", str(limit)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)


def test_study_writes_rows_and_a_plot_and_resumes_without_redoing_them(data_dir, tmp_path):
    run(tmp_path, data_dir, limit=2)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 2 and (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 0
    assert {r["l0_weight"] for r in rows} == {"0.0", "0.2"} and all(r["steps"] == "2" for r in rows)
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["epsilon_spent"]) <= float(r["epsilon"]) for r in rows)
    second = run(tmp_path, data_dir, limit=1)
    rows2 = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows2[:2] == rows and len(rows2) == 3  # the finished rows were kept and skipped, one new row added
    assert second.stderr.count("done, skipped") == 2
