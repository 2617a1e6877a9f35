"""`zoo reproduce`: a real tiny checkpoint, registered as a user card through $ZOO_CARDS, checked as a user would."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.io import sha256_file
from zoo.catalog.registry import get_card
from zoo.reproduce import (EVAL_TOLERANCE, ReproduceError, checkpoint_results, parse_command,
                             reproduce_by_retraining, reproduce_checkpoint)

NAME = "test-user-wrn10-1"
COMMAND = (f"ZOO_DATA=/elsewhere/data zoo train {NAME} --seed 0 --steps 2 --batch-size 16 --physical-batch-size 16 "
           "--augmult 1 --train-subset 200 --test-subset 100 --no-progress")
METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def zoo_cli(*args, cards: Path | None = None):
    env = {**os.environ, "ZOO_CARDS": str(cards)} if cards else {k: v for k, v in os.environ.items()
                                                                  if k != "ZOO_CARDS"}
    return subprocess.run([sys.executable, "-m", "zoo.cli", *args], capture_output=True, text=True, env=env)


def write_card(folder: Path, checkpoint: dict | None, results: list[dict]) -> Path:
    card = json.loads((Path(__file__).resolve().parent / "models" / "test-wrn10-1.json").read_text())
    card.update(name=NAME, summary="TEST ONLY: a user card (ZOO_CARDS)", results=results,
                checkpoints=[] if checkpoint is None else [{"tag": "dp_test", **checkpoint}])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{NAME}.json").write_text(json.dumps(card, indent=2))
    return folder


def card_results(result: dict, command: str = COMMAND, **change) -> list[dict]:
    """The card entries a maintainer writes from a run's result.json: its test metrics at its ledger's epsilon."""
    led = result["ledger"]
    return [{"dataset": result["dataset"], "split": "test", "metric": m,
             "value": round(result["test"][m], 4) + change.get(m, 0.0), "epsilon": round(led["epsilon"], 2),
             "delta": led["delta"], "accountant": led["accountant"], "command": command,
             "hardware": result["hardware"], "date": "2026-01-01"} for m in METRICS]


@pytest.fixture(scope="module")
def published(data_dir, tmp_path_factory):
    """``(root, result)``: a 2-step run of a user card, trained by :data:`COMMAND`, and the card under ``root/cards``
    naming its checkpoint (relative to ``root``) with its sha256 and the run's test metrics."""
    root = tmp_path_factory.mktemp("published")
    cards = write_card(root / "cards", None, [])
    p = zoo_cli(*COMMAND.split()[2:], "--data-dir", str(data_dir), "--out", str(root / "run"), cards=cards)
    assert p.returncode == 0, p.stderr
    result = json.loads((root / "run" / "result.json").read_text())
    ck = {"file": "run/final.safetensors", "sha256": sha256_file(root / "run" / "final.safetensors")}
    write_card(cards, ck, card_results(result))
    return root, result


@pytest.fixture
def register(monkeypatch):
    """``register(folder)``: load a cards folder with the registry's own loader, for this test only."""
    from zoo.catalog import registry
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_ROOTS", dict(registry._ROOTS))
    return registry.load_cards


def test_checkpoint_reproduces_and_a_value_off_by_more_than_the_tolerance_fails(published, data_dir, tmp_path):
    root, result = published
    p = zoo_cli("reproduce", NAME, "--data-dir", str(data_dir), "--report", str(tmp_path / "r.json"),
                cards=root / "cards")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{NAME}: reproduced (checkpoint)" in p.stdout and "evaluated on 100 test images" in p.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and [c["metric"] for c in report["checks"]] == list(METRICS)
    for c in report["checks"]:  # same machine, same weights, same 100 images: the run's own numbers
        assert c["measured"] == result["test"][c["metric"]] and c["tolerance"] == EVAL_TOLERANCE

    ck = json.loads((root / "cards" / f"{NAME}.json").read_text())["checkpoints"][0]
    ck["file"] = str(root / "run" / "final.safetensors")  # an absolute path works too
    off = write_card(tmp_path / "off", ck, card_results(result, accuracy=2 * EVAL_TOLERANCE))
    p = zoo_cli("reproduce", NAME, "--data-dir", str(data_dir), cards=off)
    assert p.returncode == 1 and "NOT reproduced" in p.stdout
    acc, reported = result["test"]["accuracy"], round(result["test"]["accuracy"], 4) + 2 * EVAL_TOLERANCE
    fails = [line.split()[4:] for line in p.stdout.splitlines() if "FAIL" in line]  # after "dp_test: cifar10, ε=.., δ=..,"
    assert fails == [["accuracy", f"{reported:.4f}", f"{acc:.4f}", f"{acc - reported:+.4f}", f"{EVAL_TOLERANCE:g}",
                      "FAIL"]]


def test_retrain_reruns_the_recorded_command_exactly(published, data_dir, tmp_path):
    root, result = published
    p = zoo_cli("reproduce", NAME, "--retrain", "--data-dir", str(data_dir), "--out", str(tmp_path / "rerun"),
                "--report", str(tmp_path / "r.json"), cards=root / "cards")
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    checks = {c["metric"]: c for c in report["checks"]}
    for m in METRICS:  # seed 0 on the same machine: bit for bit the published run
        assert checks[m]["measured"] == result["test"][m]
    assert checks["epsilon (ledger)"]["measured"] == result["ledger"]["epsilon"]
    rerun = json.loads((tmp_path / "rerun" / "run-0" / "result.json").read_text())
    assert rerun["ledger"] == result["ledger"]


def test_tolerance_is_a_parameter(published, data_dir, tmp_path, register):
    root, result = published
    ck = {"file": str(root / "run" / "final.safetensors"), "sha256": sha256_file(root / "run" / "final.safetensors")}
    register(write_card(tmp_path / "cards", ck, card_results(result, roc_auc=-0.01)))
    assert not reproduce_checkpoint(NAME, data_dir=data_dir).ok
    report = reproduce_checkpoint(NAME, data_dir=data_dir, tolerance=0.011)
    assert report.ok and [c.ok for c in report.checks] == [True] * 3


def test_tampered_or_replaced_checkpoint_is_refused(published, data_dir, tmp_path, register):
    from zoo.catalog.checkpoint import CheckpointIntegrityError, save_checkpoint
    from zoo.catalog.registry import load_checkpoint

    root, _ = published
    shutil.copytree(root / "run", tmp_path / "run")
    shutil.copytree(root / "cards", tmp_path / "cards")  # the same card: relative file, the published sha256
    register(tmp_path / "cards")
    model, side = load_checkpoint(tmp_path / "run" / "final.safetensors")  # a valid checkpoint, saved anew: the
    save_checkpoint(tmp_path / "run" / "final", model=model, model_name=NAME, model_args=side["args"],  # sidecar
                    card=side["card"], ledger=side["ledger"], metrics=side["metrics"])        # agrees, the card not
    with pytest.raises(CheckpointIntegrityError, match="the model card says"):
        reproduce_checkpoint(NAME, data_dir=data_dir)
    f = tmp_path / "run" / "final.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    with pytest.raises(CheckpointIntegrityError, match="sha256"):
        reproduce_checkpoint(NAME, data_dir=data_dir)


def test_unmatched_results_and_commands_that_cannot_be_rerun(published, data_dir, tmp_path, register):
    root, result = published
    ck = {"file": str(root / "run" / "final.safetensors"), "sha256": sha256_file(root / "run" / "final.safetensors")}
    other = [dict(r, epsilon=r["epsilon"] + 1) for r in card_results(result)]
    register(write_card(tmp_path / "a", ck, other + card_results(result, command="python eval/some_study.py")))
    with pytest.raises(ReproduceError, match="no result .* matches its checkpoint"):
        checkpoint_results(get_card(NAME), {**result["ledger"], "epsilon": result["ledger"]["epsilon"] + 3})
    found = checkpoint_results(get_card(NAME), result["ledger"])  # the study's results match the checkpoint
    assert [r["metric"] for r in found] == list(METRICS)
    with pytest.raises(ReproduceError, match="more than once"):
        checkpoint_results({**get_card(NAME), "results": found + found[:1]}, result["ledger"])
    report = reproduce_by_retraining(NAME, epsilon=round(result["ledger"]["epsilon"], 2))
    assert not report.ok and len(report.checks) == len(METRICS)
    assert all(c.measured is None and c.note.startswith("not reproducible by command") for c in report.checks)


def test_a_model_without_checkpoint_says_what_to_do():
    with pytest.raises(ReproduceError, match="no checkpoint is published for 'test-wrn10-1'") as e:
        reproduce_checkpoint("test-wrn10-1")
    assert "zoo reproduce test-wrn10-1 --retrain" in str(e.value) and "zoo train test-wrn10-1" in str(e.value)


def test_parse_command_reads_recorded_commands_with_zoos_parser():
    a = parse_command("ZOO_DATA=../shared/data zoo train wrn16-1 --seed 0 --batch-size 128 --delta 1e-4")
    assert (a.cmd, a.name, a.seed, a.recipe["batch_size"], a.recipe["delta"]) == ("train", "wrn16-1", 0, 128, 1e-4)
    assert parse_command(".venv/bin/python -m zoo.cli finetune ck.safetensors --dataset pneumoniamnist").cmd == \
        "finetune"
    with pytest.raises(ReproduceError, match="not a `zoo train` or `zoo finetune`"):
        parse_command("zoo eval wrn16-1")
    with pytest.raises(ReproduceError, match="unrecognized arguments: --colour"):
        parse_command("zoo train wrn16-1 --colour blue")
    with pytest.raises(ReproduceError, match="not a zoo command"):
        parse_command("python eval/study_pneumonia.py")
