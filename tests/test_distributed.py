"""Multi-process DP-SGD (torchrun, gloo on CPU): the same batches, clipping and noise as one process, one ledger."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

import zoo

RUN = dict(train_subset=256, batch_size=64, physical_batch_size=16, augmult=2, steps=3, epsilon=4.0, delta=1e-3)
FLAGS = ["--train-subset", "256", "--batch-size", "64", "--physical-batch-size", "16", "--augmult", "2",
         "--steps", "3", "--epsilon", "4", "--delta", "1e-3"]


def _distance(a: dict, b: dict) -> float:
    return torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)).item()


def test_two_processes_train_the_model_one_process_trains(data_dir, tmp_path):
    """``torchrun --nproc_per_node 2`` and a single process, same seed: the same sigma and ledger, and final weights
    equal up to float summation order. Noise added on both ranks, or on none, or a sample counted on both ranks
    would move the weights by about the distance between two seeds (about 17 here), not by < 1e-3. Then the
    two-process run is cut back to step 2 and resumed by two processes: again the one-process run."""
    one = zoo.train("test-wrn10-1", out_dir=tmp_path / "one", data_dir=data_dir, seed=0, test_subset=100,
                    progress=False, **RUN)
    zoo.train("test-wrn10-1", out_dir=tmp_path / "other", data_dir=data_dir, seed=1, test_subset=100,
              progress=False, **RUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "zoo.cli", "train", "test-wrn10-1", "--data-dir", str(data_dir), "--out", str(tmp_path / "two"),
           "--test-subset", "100", "--no-progress", "--checkpoint-every", "1", *FLAGS]
    run = subprocess.run([*cmd, "--seed", "0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("test-wrn10-1 on cifar10:") == 1  # rank 0 reports; rank 1 is silent

    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["noise_multiplier"] == one["noise_multiplier"] and two["sample_rate"] == one["sample_rate"]
    assert two["ledger"]["history"] == one["ledger"]["history"]  # one ledger, the single process's
    assert two["ledger"]["epsilon"] == one["ledger"]["epsilon"] and two["test"]["processes"] == 2
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    seeds_apart = _distance(a, load_file(tmp_path / "other" / "final.safetensors"))
    assert _distance(a, b) < 1e-3 < seeds_apart / 1000
    assert abs(two["test"]["accuracy"] - one["test"]["accuracy"]) <= 0.02  # 100 images: at most 2 flip

    # interrupted after step 2: both processes resume from rank 0's checkpoint (its seed) and finish the same run
    for name in ("step-000003", "final"):
        for suffix in (".safetensors", ".json"):
            (tmp_path / "two" / f"{name}{suffix}").unlink()
    run = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.count("resuming from") == 1, run.stdout + run.stderr
    resumed = json.loads((tmp_path / "two" / "result.json").read_text())
    assert resumed["ledger"]["history"] == one["ledger"]["history"]  # step 3 counted once
    assert _distance(a, load_file(tmp_path / "two" / "final.safetensors")) < 1e-3
