"""Crashes: a training run killed (SIGKILL) at random points and resumed spends exactly what an uninterrupted run
spends, counts no step twice or never, and never leaves a half-written checkpoint behind."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.catalog.checkpoint import read_checkpoint

STEPS = 8
RUN = dict(train_subset=128, batch_size=32, physical_batch_size=16, augmult=2, steps=STEPS, epsilon=3.0, delta=1e-3)
FLAGS = ["--train-subset", "128", "--batch-size", "32", "--physical-batch-size", "16", "--augmult", "2",
         "--steps", str(STEPS), "--epsilon", "3", "--delta", "1e-3"]


def _committed_checkpoints_verify(out: Path) -> list[dict]:
    """Every committed checkpoint (a sidecar is present) verifies, and its ledger counts exactly the steps its
    training state says were taken. Returns their sidecars."""
    sidecars = []
    for side in sorted(out.glob("*.json")):
        if side.name == "result.json":
            continue
        _, sidecar = read_checkpoint(side)  # raises on a truncated, torn or mismatched pair
        state = sidecar["train_state"]
        assert sidecar["ledger"]["steps"] == state["ledger_steps_before"] + state["step"], side.name
        sidecars.append(sidecar)
    return sidecars


def _kill_when(proc: subprocess.Popen, out: Path, mode: str, rng: random.Random) -> bool:
    """SIGKILL ``proc`` while it trains: ``mode`` "write" kills it the moment its n-th checkpoint write is under
    way (a temporary file exists: mid-write), "time" at a random moment (up to 0.5 s) after its first write. False when the
    run ended on its own first."""
    target, seen, started = rng.randint(1, 3), set(), None
    delay = rng.uniform(0.0, 0.5)
    listing = lambda: set(os.listdir(out)) if out.exists() else set()  # noqa: E731
    before = listing()
    while proc.poll() is None:
        now = listing()
        seen |= {name for name in now if name.endswith(".tmp")}
        if started is None and now != before:
            started = time.monotonic()
        if (mode == "write" and len(seen) >= target) or (
                mode == "time" and started is not None and time.monotonic() - started >= delay):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    return False


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    ref = zoo.train("test-wrn10-1", out_dir=tmp_path / "ref", data_dir=data_dir, seed=0, checkpoint_every=1,
                    test_subset=100, progress=False, **RUN)
    out = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "zoo.cli", "train", "test-wrn10-1", "--data-dir", str(data_dir), "--out", str(out),
           "--seed", "0", "--checkpoint-every", "1", "--test-subset", "100", "--no-progress", "--resume", *FLAGS]
    rng, kills, modes = random.Random(0), [], ["write", "write", "time", "write", "time", None]  # None: let it end
    left, cleaned = set(), []
    for mode in modes:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # a killed run's output is kept
        killed = mode is not None and _kill_when(proc, out, mode, rng)
        output = proc.communicate(timeout=600)[0]
        for name in left:  # what the previous kill left of an uncommitted write is removed on resume
            assert f"removing {name}" in output, output
        cleaned += sorted(left)
        if not killed:
            assert proc.returncode == 0, output
            break
        kills.append(mode)
        _committed_checkpoints_verify(out)  # whatever the moment, every committed checkpoint is whole
        left = {p.name for p in out.glob(".*.tmp")} | {
            p.name for p in out.glob("step-*.safetensors") if not p.with_suffix(".json").exists()}
    print(f"\nkilled {len(kills)} times ({', '.join(kills)}); uncommitted files removed on resume: {cleaned}")
    assert kills.count("write") >= 2, f"the run ended before it could be killed mid-write: {kills}"
    assert not list(out.glob(".*.tmp"))

    final = _committed_checkpoints_verify(out)
    ledger = json.loads((out / "final.json").read_text())["ledger"]
    assert ledger["steps"] == STEPS and ledger["history"] == ref["ledger"]["history"]  # none twice, none lost
    assert ledger["epsilon"] == ref["ledger"]["epsilon"]
    assert all(s["ledger"]["steps"] <= STEPS for s in final)
    a, b = load_file(tmp_path / "ref" / "final.safetensors"), load_file(out / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same run, draw for draw


def test_resume_refuses_a_checkpoint_whose_ledger_and_step_disagree(data_dir, tmp_path):
    """A verified checkpoint whose ledger counts another number of steps than its training state (a step counted
    twice or lost) is refused on resume, not silently continued."""
    from zoo.catalog.checkpoint import CheckpointIntegrityError, load_training_state, save_checkpoint

    kw = dict(data_dir=data_dir, seed=0, test_subset=50, progress=False, **{**RUN, "steps": 2})
    zoo.train("test-wrn10-1", out_dir=tmp_path, checkpoint_every=1, **kw)
    tensors, sidecar = read_checkpoint(tmp_path / "step-000002")
    model = zoo.create_model("test-wrn10-1")
    load_training_state(tensors, model, None, None)
    state = {**sidecar["train_state"], "step": 1}  # the ledger says 2 steps
    save_checkpoint(tmp_path / "step-000002", model=model, model_name=sidecar["model"], model_args=sidecar["args"],
                    card=sidecar["card"], ledger=sidecar["ledger"], train_state=state)
    with pytest.raises(CheckpointIntegrityError, match="ledger counts 2 steps but the run was at step 1"):
        zoo.train("test-wrn10-1", out_dir=tmp_path, resume=True, **kw)
