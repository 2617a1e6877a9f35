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


SEG_SCRIPT = SCRIPT.parent / "study_segmentation.py"


def run_seg(out: Path, data_dir: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SEG_SCRIPT), "--config", "cpu", "--out", str(out), "--runs",
                           str(out / "runs"), "--data-dir", str(data_dir), "--models", "test-unet-w4",
                           "--datasets", "isbi2012", "--epsilons", "inf", "8", "--steps", "2", "--limit", str(limit)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)


def test_segmentation_study_writes_csv_plot_and_table_and_resumes(data_dir, tmp_path):
    run_seg(tmp_path, data_dir, limit=1)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["epsilon"] == "inf" and float(rows[0]["sigma"]) == 0.0
    run_seg(tmp_path, data_dir, limit=5)
    rows2 = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows2[:1] == rows and [r["epsilon"] for r in rows2] == ["inf", "8.0"]  # the first row was not redone
    dp = rows2[1]
    assert 0 < float(dp["sigma"]) and float(dp["epsilon_spent"]) <= 8.0 and dp["steps"] == "2"
    assert all(0 <= float(r[k]) <= 1 for r in rows2 for k in ("dice", "iou", "dice_0", "iou_1"))
    assert float(dp["psg_mib"]) == int(dp["params"]) * 4 * 10 * 2 / 2 ** 20  # physical batch 10 x 2 views, float32
    assert (tmp_path / "dice_vs_epsilon.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "| `test-unet-w4` | width 2 |" in table and "ε = ∞" in table and "ε = 8" in table
    assert "predicting foreground everywhere scores 0." in table
