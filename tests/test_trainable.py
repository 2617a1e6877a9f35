"""The recipe's ``trainable``: DP-SGD trains (computes, clips and noises the gradients of) the selected parameters
only; the others are constants of the released model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.catalog.registry import load_checkpoint
from zoo.models._base import set_trainable, trainable_names


@pytest.mark.parametrize("name", zoo.list_models())
def test_presets_select_the_head_and_the_norms_of_every_model(name):
    torch.manual_seed(0)
    model = zoo.create_model(name)
    names = [n for n, _ in model.named_parameters()]
    head = trainable_names(model, "head")
    assert head and all(n.startswith(model.head_name + ".") for n in head)
    assert set(head) == {f"{model.head_name}.{n}" for n, _ in model.get_classifier().named_parameters()}
    with_norm = trainable_names(model, "head+norm")
    assert set(head) <= set(with_norm) <= set(names)
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if "Norm" in type(mod).__name__
             for p, _ in mod.named_parameters(recurse=False)}
    assert set(with_norm) == set(head) | norms
    assert trainable_names(model, None) == trainable_names(model, "all") == names


def test_patterns_and_counts():
    model = zoo.create_model("test-unet-w4")
    picked = trainable_names(model, "decoder.*, head.*")
    assert picked and all(n.startswith(("decoder.", "head.")) for n in picked)
    trainable, total = set_trainable(model, "head")
    assert trainable == sum(p.numel() for p in model.head.parameters())
    assert total == sum(p.numel() for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="matches no parameter.*presets: all, head, head\\+norm"):
        trainable_names(model, "encoder.*, nothing.*")


def test_only_the_selected_parameters_move_and_the_run_records_it(data_dir, tmp_path):
    """A private fine-tune of the head alone: every other weight of the released model is the checkpoint's own,
    bit for bit; the head has moved; the sidecar says what was trained."""
    kw = dict(data_dir=data_dir, seed=0, steps=3, batch_size=64, physical_batch_size=64, augmult=1, test_subset=100,
              progress=False)
    zoo.train("test-wrn10-1", out_dir=tmp_path / "base", **kw)
    base = load_file(tmp_path / "base" / "final.safetensors")
    r = zoo.finetune(tmp_path / "base" / "final.safetensors", dataset="cifar10", epsilon=8.0, delta=1e-5,
                     out_dir=tmp_path / "ft", trainable="head", **kw)
    tuned = load_file(tmp_path / "ft" / "final.safetensors")
    moved = sorted(k for k in base if not torch.equal(base[k], tuned[k]))
    assert moved == ["model.head.bias", "model.head.weight"], moved  # the EMA weights, stored under "model."
    sidecar = json.loads((tmp_path / "ft" / "final.json").read_text())
    _, side = load_checkpoint(tmp_path / "ft" / "final.safetensors")
    facts = side["training"]["trainable"]
    assert facts["spec"] == "head" and facts["params"] == base["model.head.weight"].numel() + base["model.head.bias"].numel()
    assert facts["of"] > facts["params"]
    assert sidecar["training"]["trainable"] == facts and r["ledger"]["epsilon"] <= 8.0


def test_a_bad_selection_is_refused_before_anything_is_spent(data_dir, tmp_path):
    with pytest.raises(ValueError, match="matches no parameter"):
        zoo.train("test-wrn10-1", out_dir=tmp_path / "run", data_dir=data_dir, seed=0, steps=2, batch_size=64,
                  physical_batch_size=64, test_subset=100, progress=False, trainable="nothing.*")
    assert not any((tmp_path / "run").glob("*.safetensors"))
