"""Publishing: a finished secret-seed run becomes ``NAME.TAG`` (timm's ``arch.tag``) with a sidecar that carries the
ledger, the input preparation and the training facts; loading, listing, ``model_info`` and ``zoo reproduce`` work
by tag; bad tags and incomplete sidecars are refused with a message. Every published checkpoint of the repository
is checked the same way (parametrized over ``zoo.list_models(pretrained=True)``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.catalog.checkpoint import CheckpointIntegrityError, save_checkpoint
from zoo.cli import main
from zoo.data import get_dataset_info, prepare_input
from zoo.publish import NO_SPREAD_YET, PublishError, attach_spread, publish
from zoo.catalog.registry import UnknownTagError, load_checkpoint, load_published
from zoo.reproduce import reproduce_checkpoint

NAME = "test-user-wrn10-1"


@pytest.fixture
def register(monkeypatch):
    """``register(folder)``: load a cards folder with the registry's own loader, for this test only."""
    from zoo.catalog import registry
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_ROOTS", dict(registry._ROOTS))
    return registry.load_cards


@pytest.fixture(scope="module")
def secret_run(data_dir, tmp_path_factory):
    """A 2-step run of test-wrn10-1 with a secret (OS) seed: what a release is trained with."""
    out = tmp_path_factory.mktemp("run") / "r"
    zoo.train("test-wrn10-1", out_dir=out, data_dir=data_dir, steps=2, test_subset=50, progress=False)
    return out


@pytest.fixture
def user_card(tmp_path, register):
    cards = tmp_path / "models"
    cards.mkdir()
    card = json.loads((Path(__file__).resolve().parent / "models" / "test-wrn10-1.json").read_text())
    card.update(name=NAME, summary="TEST ONLY: a user card", results=[], checkpoints=[])
    (cards / f"{NAME}.json").write_text(json.dumps(card, indent=2) + "\n")
    register(cards)
    return cards


def _publish(secret_run, user_card, data_dir, register, tag="dp_test", **kw):
    out = publish(secret_run, NAME, tag, data_dir=data_dir, cards_dir=user_card,
                  weights_dir=user_card.parent / "weights", **kw)
    from zoo.catalog import registry
    registry._MODELS.pop(NAME)
    register(user_card)  # the card as written
    return out


def test_a_published_run_loads_by_tag_with_its_preparation_and_reproduces(secret_run, user_card, data_dir,
                                                                          register):
    out = _publish(secret_run, user_card, data_dir, register)
    assert f"{NAME}.dp_test" in zoo.list_models(pretrained=True)
    assert zoo.list_models("test-user-*", pretrained=True) == [f"{NAME}.dp_test"]
    model = zoo.create_model(f"{NAME}.dp_test", pretrained=True)
    same = zoo.create_model(NAME, pretrained=True)  # the name alone: the default (first) checkpoint
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == [3, 32, 32] and cfg["tag"] == "dp_test" and len(cfg["mean"]) == 3
    assert cfg["ledger"]["dataset"] == "cifar10"
    assert cfg["ledger"]["augmult"] == zoo.model_info(NAME)["recipe"]["augmult"]
    # the preparation turns raw 8-bit images into exactly what training fed the model
    test = get_dataset_info("cifar10").load("test", data_dir=data_dir)
    assert torch.equal(prepare_input(test.images[:6], cfg), test.batch(torch.arange(6))[0])
    info = zoo.model_info(f"{NAME}.dp_test")["pretrained"][f"{NAME}.dp_test"]
    assert info["status"] == "available" and info["preparation"] == {k: v for k, v in cfg.items()
                                                                     if k not in ("tag", "ledger")}
    assert info["training"]["seed"].startswith("withheld") and info["training"]["samples_processed"] > 0
    side = json.loads((user_card.parent / "weights" / f"{NAME}.dp_test.json").read_text())
    assert "seed" not in side["train_state"] and side["ledger"]["steps"] == 2
    # float16 storage only with the test metrics unchanged, and the card reports the stored weights' metrics
    check = side["training"]["precision_check"]
    assert check["largest_metric_change_fp16"] <= check["tolerance"] or check["stored"] == "float32"
    tensors = load_file(out["file"])
    assert {v.dtype for k, v in tensors.items() if k.endswith("weight")} == {
        torch.float16 if check["stored"] == "float16" else torch.float32}
    card = zoo.model_info(NAME)
    assert {r["checkpoint"] for r in card["results"]} == {"dp_test"}
    report = reproduce_checkpoint(NAME, data_dir=data_dir)
    assert report.ok and len(report.checks) == 3, report.table()


def test_a_seed_spread_measured_after_publishing_is_attached_to_the_card_only(secret_run, user_card, data_dir,
                                                                             register):
    _publish(secret_run, user_card, data_dir, register, note=f"published before its seeds, {NO_SPREAD_YET}")
    side = (user_card.parent / "weights" / f"{NAME}.dp_test.json").read_text()
    before = {r["metric"]: r for r in zoo.model_info(NAME)["results"]}
    assert all("seed_std" not in r for r in before.values())
    n = attach_spread(NAME, "dp_test", {"accuracy": (0.0123, 3, "a study, 3 seeds")}, "which followed: 3 seeds",
                      cards_dir=user_card)
    assert n == 1
    from zoo.catalog import registry
    registry._MODELS.pop(NAME)
    register(user_card)
    after = {r["metric"]: r for r in zoo.model_info(NAME)["results"]}
    acc = after["accuracy"]
    assert (acc["seed_std"], acc["seed_n"], acc["seed_spread_source"]) == (0.0123, 3, "a study, 3 seeds")
    assert acc["note"].endswith("published before its seeds, which followed: 3 seeds") and acc["value"] == \
        before["accuracy"]["value"]
    assert all("seed_std" not in r and r["value"] == before[m]["value"] and r["note"] == acc["note"]
               for m, r in after.items() if m != "accuracy")  # the note is the checkpoint's, the spread the metric's
    assert (user_card.parent / "weights" / f"{NAME}.dp_test.json").read_text() == side  # the checkpoint untouched
    with pytest.raises(PublishError, match="no checkpoint tagged 'dp_eps9'.*dp_test"):
        attach_spread(NAME, "dp_eps9", {"accuracy": (0.01, 3, "s")}, "n", cards_dir=user_card)


def test_unknown_tag_lists_the_tags(secret_run, user_card, data_dir, register):
    _publish(secret_run, user_card, data_dir, register)
    with pytest.raises(UnknownTagError, match=rf"no checkpoint tagged 'dp_eps9'; its checkpoints: {NAME}.dp_test"):
        zoo.create_model(f"{NAME}.dp_eps9", pretrained=True)
    with pytest.raises(UnknownTagError, match="none published yet"):
        zoo.model_info("test-wrn10-1.dp_eps8")


@pytest.mark.parametrize("missing", ["preparation", "ledger"])
def test_a_sidecar_without_preparation_or_ledger_is_refused(missing, secret_run, user_card, register):
    model, side = load_checkpoint(secret_run / "final.safetensors")
    kw = {"ledger": side["ledger"], "preparation": side["preparation"], missing: None}
    weights = user_card.parent / "weights"
    st = save_checkpoint(weights / f"{NAME}.bare", model=model, model_name=NAME, model_args=side["args"],
                         card=side["card"], **kw)  # a valid, hash-consistent checkpoint, but incomplete
    card = json.loads((user_card / f"{NAME}.json").read_text())
    from zoo.io import sha256_file

    card["checkpoints"] = [{"tag": "bare", "file": f"weights/{st.name}", "sha256": sha256_file(st)}]
    (user_card / f"{NAME}.json").write_text(json.dumps(card, indent=2) + "\n")
    from zoo.catalog import registry
    registry._MODELS.pop(NAME)
    register(user_card)
    with pytest.raises(CheckpointIntegrityError, match=f"not a publishable checkpoint: its sidecar has no {missing}"):
        load_published(f"{NAME}.bare")
    assert "error" in zoo.model_info(NAME)["pretrained"][f"{NAME}.bare"]


def test_a_seeded_run_is_not_a_release(data_dir, tmp_path, user_card):
    zoo.train("test-wrn10-1", out_dir=tmp_path / "s", data_dir=data_dir, seed=0, steps=1, test_subset=20,
              progress=False)
    with pytest.raises(PublishError, match="user-given seed.*measurement, not a private release"):
        publish(tmp_path / "s", NAME, "dp", data_dir=data_dir, cards_dir=user_card, weights_dir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_nonprivate_checkpoint_is_tagged_so_and_never_the_default(data_dir, tmp_path, user_card, register):
    zoo.train("test-wrn10-1", out_dir=tmp_path / "inf", data_dir=data_dir, steps=1, test_subset=20, progress=False,
              epsilon=float("inf"))
    with pytest.raises(PublishError, match="must be tagged nonprivate_"):
        publish(tmp_path / "inf", NAME, "dp", data_dir=data_dir, cards_dir=user_card, weights_dir=tmp_path / "w")
    _publish(tmp_path / "inf", user_card, data_dir, register, tag="nonprivate_cifar10")
    with pytest.raises(FileNotFoundError, match="only non-private checkpoints .* loaded only when named"):
        zoo.create_model(NAME, pretrained=True)
    model = zoo.create_model(f"{NAME}.nonprivate_cifar10", pretrained=True)
    assert model.pretrained_cfg["ledger"]["epsilon"] == float("inf")


def test_list_pretrained_with_nothing_published_says_so(capsys):
    assert main(["list", "test-*", "--pretrained"]) == 0
    io = capsys.readouterr()
    assert io.out == "" and "no published checkpoint matches 'test-*'" in io.err


# ----------------------------------------------------------------------------- every published checkpoint
@pytest.mark.parametrize("full", zoo.list_models(pretrained=True))
def test_every_published_checkpoint_is_complete_and_reproduces(full, data_dir):
    model, side = load_published(full)
    assert side["training"]["seed"].startswith("withheld") and "seed" not in side["train_state"]
    assert side["preparation"]["input_size"][0] == model.in_chans
    name, tag = full.split(".")
    card = zoo.model_info(name)
    assert any(r.get("checkpoint") == tag for r in card["results"]), "every published checkpoint has card results"
    report = reproduce_checkpoint(full, data_dir=data_dir)
    assert report.ok, report.table()


@pytest.mark.parametrize("full", [n for n in zoo.list_models(pretrained=True)
                                  if zoo.model_info(n)["task"] == "segmentation"])
def test_every_published_segmenter_masks_a_users_image_of_any_size(full):
    """A segmentation release, loaded by name, gives a mask of the image's own size for a raw image larger than its
    training images and of no multiple of its size (zoo.segment: resized, or tiled at the data's scale)."""
    model = zoo.create_model(full, pretrained=True)
    cfg = model.pretrained_cfg
    h, w = (s * 3 // 2 + 7 for s in cfg["input_size"][1:])
    shape = (h, w, 3) if cfg["data_channels"] == 3 else (h, w)
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    mask = zoo.segment(model, image)
    assert mask.shape == (h, w) and set(mask.unique().tolist()) <= set(range(len(cfg["classes"])))

def test_a_published_segmenter_segments_a_users_image_and_reproduces(data_dir, tmp_path, register):
    """A segmentation release end to end: a secret-seed run of a U-Net on ISBI 2012, published as NAME.TAG,
    loaded by tag with its preparation, segments an image of another size (zoo.segment), reproduces its Dice."""
    run = tmp_path / "run"
    zoo.train("test-unet-w4", out_dir=run, data_dir=data_dir, steps=2, crop=32, progress=False)
    cards = tmp_path / "models"
    cards.mkdir()
    card = json.loads((Path(__file__).resolve().parent / "models" / "test-unet-w4.json").read_text())
    name = "test-user-unet-w4"
    card.update(name=name, summary="TEST ONLY: a user segmentation card", results=[], checkpoints=[])
    (cards / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    register(cards)
    publish(run, name, "dp_test", data_dir=data_dir, cards_dir=cards, weights_dir=tmp_path / "weights")
    from zoo.catalog import registry
    registry._MODELS.pop(name)
    register(cards)
    model = zoo.create_model(f"{name}.dp_test", pretrained=True)
    cfg = model.pretrained_cfg
    assert cfg["task"] == "segmentation" and cfg["classes"] == ["cell", "membrane"]
    assert cfg["resize"]["size"] == [64, 64]
    image = torch.randint(0, 256, (77, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mask = zoo.segment(model, image)
    assert mask.shape == (77, 90) and set(mask.unique().tolist()) <= {0, 1}
    metrics = {r["metric"] for r in zoo.model_info(name)["results"]}
    assert {"dice", "iou"} <= metrics
    report = reproduce_checkpoint(name, data_dir=data_dir)
    assert report.ok, report.table()


def test_a_pruning_recipe_publishes_a_plain_network_that_loads_without_gates(data_dir, tmp_path, register):
    """A gated card whose recipe prunes: the run's final checkpoint is the pruned network (no gates, the same
    outputs as the gated EMA model), publishes under the gated card (the architecture trained), loads by name
    without gates, reproduces, and fine-tunes privately as a plain network."""
    from zoo.nn.sparse import gate_modules

    cards = tmp_path / "models"
    cards.mkdir()
    name = "test-user-wrn10-1-l0"
    card = json.loads((Path(__file__).resolve().parent / "models" / "test-wrn10-1-l0.json").read_text())
    card.update(name=name, summary="TEST ONLY: a pruned release", results=[], checkpoints=[])
    card["recipe"]["prune"] = True
    card["args"]["l0_drop_rate"] = 0.9  # test-time gates sigmoid(log_alpha) 1.2 - 0.1 = 0.02 at init: some close
    (cards / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    register(cards)
    gated = zoo.create_model(name)
    r = zoo.train(name, out_dir=tmp_path / "run", data_dir=data_dir, steps=2, test_subset=50, progress=False)
    small = r["model_object"]
    assert gate_modules(gated) and not gate_modules(small)
    rep = r["pruning"]
    assert rep["params_after"] < rep["params_before"] and rep["args"]["mid_channels"] == small.arch["mid_channels"]
    side = json.loads((tmp_path / "run" / "final.json").read_text())
    assert side["args"]["mid_channels"] == rep["args"]["mid_channels"] and "l0" not in side["args"]
    assert side["training"]["pruning"]["from_args"]["l0"] is True
    out = publish(tmp_path / "run", name, "dp_test", data_dir=data_dir, cards_dir=cards,
                  weights_dir=tmp_path / "weights")
    from zoo.catalog import registry
    registry._MODELS.pop(name)
    register(cards)
    loaded = zoo.create_model(name, pretrained=True)
    assert not gate_modules(loaded) and sum(p.numel() for p in loaded.parameters()) == rep["params_after"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), small.eval()(x), atol=1e-2, rtol=1e-2)  # float16 storage at most
    note = zoo.model_info(name)["results"][0]["note"]
    assert f"pruned by zoo.prune (exact: same outputs) from {rep['params_before']:,}" in note
    assert reproduce_checkpoint(name, data_dir=data_dir).ok
    tuned = zoo.finetune(f"{name}.dp_test", "pneumoniamnist", 8.0, 1e-4, out_dir=tmp_path / "ft", steps=1,
                         batch_size=32, physical_batch_size=32, augmult=1, test_subset=20, progress=False)
    assert not gate_modules(tuned["model_object"]) and out["metrics"]
    again, _ = load_checkpoint(tmp_path / "ft" / "final.safetensors")
    assert again.arch["mid_channels"] == rep["args"]["mid_channels"]


def test_a_pruning_recipe_refuses_a_model_without_gates_before_reading_data(tmp_path):
    with pytest.raises(ValueError, match="prune=true prunes an L0 model.*has no gates"):
        zoo.train("test-wrn10-1", out_dir=tmp_path / "r", data_dir=tmp_path / "nowhere", steps=1, prune=True,
                  progress=False)
