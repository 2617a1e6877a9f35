"""Checkpoints: safetensors + JSON sidecar, verified on every load, written atomically."""
from __future__ import annotations

import json

import pytest

import zoo
from zoo.catalog.checkpoint import CheckpointIntegrityError, read_checkpoint, save_checkpoint
from zoo.catalog.registry import get_card, load_checkpoint

NAME = "test-wrn10-1"


@pytest.fixture
def saved(tmp_path):
    model = zoo.create_model(NAME)
    card = get_card(NAME)
    args = {**card["args"], "num_classes": 10, "in_chans": 3}
    path = save_checkpoint(tmp_path / "ck", model=model, model_name=NAME, model_args=args, card=card,
                           ledger={"dataset": "cifar10", "epsilon": 3.0})
    return path, model, args, card


def test_tampered_weights_refused(saved):
    path = saved[0]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="sha256"):
        load_checkpoint(path)


def test_truncated_weights_refused(saved):
    path = saved[0]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointIntegrityError, match="truncated"):
        load_checkpoint(path)


def test_edited_sidecar_refused(saved):
    path = saved[0]
    side = path.with_suffix(".json")
    d = json.loads(side.read_text())
    d["ledger"]["epsilon"] = 0.1  # claim a smaller epsilon than was spent
    side.write_text(json.dumps(d))
    with pytest.raises(CheckpointIntegrityError, match="edited"):
        read_checkpoint(path)
    side.write_text(side.read_text()[:50])
    with pytest.raises(CheckpointIntegrityError, match="not valid JSON"):
        read_checkpoint(path)


def test_card_hash_mismatch_refused(saved):
    with pytest.raises(CheckpointIntegrityError, match="model card"):
        read_checkpoint(saved[0], expected_sha256="0" * 64)


def test_missing_files_named(saved):
    saved[0].with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="ck.json"):
        load_checkpoint(saved[0])


def test_failed_write_keeps_the_old_checkpoint(saved, monkeypatch):
    path, model, args, card = saved
    before = path.read_bytes()
    import zoo.catalog.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=zoo.create_model(NAME), model_name=NAME, model_args=args, card=card, ledger=None)
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    load_checkpoint(path)  # still verifies


def test_no_pickle_anywhere_in_zoo():
    """Checkpoints are safetensors + JSON; zoo never loads pickles (torch.load and torch.distributed's object
    collectives included)."""
    import pathlib

    for src in pathlib.Path(zoo.__file__).parent.rglob("*.py"):
        text = src.read_text()
        unpickling = ("import pickle", "pickle.load", "torch.load(", "allow_pickle=True",  # and torch.distributed's
                      "broadcast_object_list", "gather_object", "scatter_object_list", "recv_object_list")  # objects
        for bad in unpickling:
            assert bad not in text, f"{src}: {bad}"


def test_checkpoints_get_the_permissions_of_a_plain_write(saved):
    """The temporary file of an atomic write is private (0600); the published files are not."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for p in (saved[0], saved[0].with_suffix(".json")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
