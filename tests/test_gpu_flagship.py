"""The prepared GPU-scale flagship script (eval/gpu_flagship.py) at a CPU-sized setting: a call stopped by its time
budget exits 3 and says how to continue; the next call resumes and finishes; a run cut after a checkpoint resumes
from it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "eval" / "gpu_flagship.py"


def _call(out, *extra, data_dir):
    env = {**os.environ, "ZOO_DATA": str(data_dir)}
    return subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *extra], capture_output=True,
                          text=True, env=env, timeout=900)


def test_flagship_script_stops_at_its_budget_and_resumes(data_dir, tmp_path):
    out = tmp_path / "flagship"
    p = _call(out, "--budget", "0.5", data_dir=data_dir)  # stopped while starting: nothing committed yet
    assert p.returncode == 3 and "Run the same command again to resume" in p.stdout, p.stdout + p.stderr
    p = _call(out, data_dir=data_dir)
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 4 and result["recipe"]["batch_size"] == 32 and result["recipe"]["augmult"] == 2
    assert result["ledger"]["epsilon"] <= 8.0 and result["training"]["seed"].startswith("withheld")
    # cut after its step-3 checkpoint (as a kill would leave it): the next call resumes from step 3
    for name in ("step-000004", "final"):
        for suffix in (".safetensors", ".json"):
            (out / f"{name}{suffix}").unlink(missing_ok=True)
    (out / "result.json").unlink()
    p = _call(out, data_dir=data_dir)
    assert p.returncode == 0 and "resuming from" in p.stdout and "step 3" in p.stdout, p.stdout + p.stderr
    assert json.loads((out / "result.json").read_text())["ledger"]["history"] == result["ledger"]["history"]
