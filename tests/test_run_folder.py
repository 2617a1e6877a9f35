"""One run per folder: a fresh run never mixes with another run's files, and ``--resume`` continues the run it
finds with that run's own settings, refusing any other (each difference named). Run as a user types it."""
from __future__ import annotations

import hashlib

import pytest

import zoo
from zoo.cli import main
from zoo.training.engine import RunFolderError

COMMON = ["--test-subset", "50", "--no-progress"]


def _snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _zoo(capsys, *args):
    rc = main([*args, *COMMON])
    return rc, capsys.readouterr()


@pytest.fixture
def first_run(data_dir, tmp_path, capsys):
    """``zoo train test-wrn10-1 --seed 0 --steps 4 --checkpoint-every 2 --out D``: the run already in D."""
    out = tmp_path / "D"
    rc, _ = _zoo(capsys, "train", "test-wrn10-1", "--data-dir", str(data_dir), "--seed", "0", "--steps", "4",
                 "--checkpoint-every", "2", "--out", str(out))
    assert rc == 0
    return out


def test_a_fresh_run_into_a_folder_with_another_run_is_refused_and_changes_nothing(data_dir, first_run, capsys):
    before = _snapshot(first_run)
    rc, io = _zoo(capsys, "train", "test-wrn10-1", "--data-dir", str(data_dir), "--seed", "1", "--steps", "2",
                  "--out", str(first_run))
    assert rc == 2
    assert "already holds a training run" in io.err and "--resume" in io.err and "final.json" in io.err
    assert _snapshot(first_run) == before  # nothing saved is lost or mixed


def test_resume_with_other_settings_names_each_difference_and_changes_nothing(data_dir, first_run, capsys):
    (first_run / "final.json").unlink()  # as if killed after its step-4 checkpoint, before the final one
    (first_run / "final.safetensors").unlink()
    before = _snapshot(first_run)
    rc, io = _zoo(capsys, "train", "test-wrn10-1", "--data-dir", str(data_dir), "--resume", "--seed", "5",
                  "--steps", "3", "--lr", "0.1", "--out", str(first_run))
    assert rc == 2
    for words in ("seed: the run has 0, asked 5", "steps: the run has 4, asked 3", "lr: the run has", "asked 0.1"):
        assert words in io.err, io.err
    assert _snapshot(first_run) == before
    # another model, or another architecture argument, is refused the same way
    rc, io = _zoo(capsys, "train", "test-wrn10-1", "--data-dir", str(data_dir), "--resume", "--model-arg",
                  "width=2", "--out", str(first_run))
    assert rc == 2 and "model argument width: the run has 1, asked 2" in io.err
    rc, io = _zoo(capsys, "train", "test-resnet9-w8", "--data-dir", str(data_dir), "--resume", "--out",
                  str(first_run))
    assert rc == 2 and "model: the run has 'test-wrn10-1'" in io.err
    assert _snapshot(first_run) == before
    # the same settings (or none at all) resume the run: the final checkpoint is the run's own step 4
    rc, io = _zoo(capsys, "train", "test-wrn10-1", "--data-dir", str(data_dir), "--resume", "--seed", "0",
                  "--steps", "4", "--out", str(first_run))
    assert rc == 0 and "resuming from" in io.out
    assert (first_run / "final.json").exists()


def test_resuming_a_complete_run_is_refused(data_dir, first_run, capsys):
    before = _snapshot(first_run)
    rc, io = _zoo(capsys, "train", "test-wrn10-1", "--data-dir", str(data_dir), "--resume", "--out", str(first_run))
    assert rc == 2 and "is complete" in io.err and "nothing to resume" in io.err
    assert _snapshot(first_run) == before


def test_the_default_folder_of_a_new_run_never_holds_another_run(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        rc, _ = _zoo(capsys, "train", "test-wrn10-1", "--data-dir", str(data_dir), "--steps", "1")
        assert rc == 0
    assert (tmp_path / "runs" / "test-wrn10-1" / "final.json").exists()
    assert (tmp_path / "runs" / "test-wrn10-1-2" / "final.json").exists()


def test_the_python_api_refuses_mixing_too(data_dir, first_run):
    with pytest.raises(RunFolderError, match="already holds a training run"):
        zoo.train("test-wrn10-1", out_dir=first_run, data_dir=data_dir, seed=1, steps=2, test_subset=50,
                  progress=False)
