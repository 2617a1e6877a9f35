"""Every registered model, parametrized over zoo.list_models(): a new model is tested once registered."""
from __future__ import annotations

import copy

import pytest
import torch

import zoo
from zoo.catalog.checkpoint import save_checkpoint
from zoo.catalog.registry import get_card, load_checkpoint
from zoo.data.tasks import task_of
from zoo.dp.validate import find_problems

MODELS = zoo.list_models()


def _size(model) -> int:
    m = model.size_multiple
    return max(16, model.min_size, m) // m * m if m > 1 else max(16, model.min_size)


def _input(model, batch=2, size=None, dtype=torch.float32):
    s = size or _size(model)
    return torch.randn(batch, model.in_chans, s, s, dtype=dtype)


def _targets(model, batch, size, num_classes=None):
    return task_of(model).example_targets(batch, num_classes or model.num_classes, (size, size),
                                          torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = zoo.create_model(name)
    card = get_card(name)
    x = torch.randn(2, *card["input_size"])
    out = model(x)
    task = task_of(model)
    assert out.shape == task.output_shape(2, card["num_classes"], tuple(card["input_size"][1:]))
    task.loss(out, _targets(model, 2, card["input_size"][1])).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", MODELS)
def test_num_classes_override_and_reset(name):
    model = zoo.create_model(name, num_classes=7)
    s = _size(model)
    shape = lambda k: task_of(model).output_shape(2, k, (s, s))  # noqa: E731
    assert model(_input(model)).shape == shape(7)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(_input(model)).shape == shape(3)


@pytest.mark.parametrize("name", MODELS)
def test_per_sample_gradients_exact(name):
    """Entry i equals the gradient of sample i's loss alone (float64, 1e-8 relative), for every parameter, in
    train mode; random layers (L0 gates) see the same draws in both computations (same seed). An L0 gate with
    scale k has the gradient of theta = log_alpha / k: k times that of log_alpha (zoo.nn.sparse)."""
    from zoo.nn.sparse import gate_modules

    model = zoo.create_model(name).double()
    scale = {id(g.log_alpha): g.scale for g in gate_modules(model)}
    x = _input(model, batch=3, dtype=torch.float64)
    y = _targets(model, 3, x.shape[-1])
    torch.manual_seed(0)
    grads = zoo.per_sample_gradients(model, x, y)  # default loss: the model task's per-sample loss
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(trainable)  # every trainable parameter got a per-sample gradient
    torch.manual_seed(0)
    losses = task_of(model).loss(model(x), y)
    for i in range(3):
        ref = torch.autograd.grad(losses[i], list(trainable.values()), retain_graph=True, allow_unused=True)
        for (n, p), r in zip(trainable.items(), ref):
            r = torch.zeros_like(p) if r is None else r * scale.get(id(p), 1.0)
            assert grads[n].shape == (3, *p.shape)
            err = (grads[n][i] - r).norm() / r.norm().clamp_min(1e-30)
            assert err < 1e-8 or (r.norm() < 1e-30 and grads[n][i].norm() < 1e-30), f"{n}: relative error {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_no_sample_sees_another(name):
    """No batch statistics: in eval mode, each sample's outputs are those of the sample alone."""
    model = zoo.create_model(name).eval()
    x = _input(model, batch=3)
    with torch.no_grad():
        full = model(x)
        for i in range(3):
            assert torch.allclose(model(x[i:i + 1])[0], full[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_validator_passes(name):
    model = zoo.create_model(name)
    assert find_problems(model) == []
    assert zoo.validate_model(model) is model


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip(name, tmp_path):
    model = zoo.create_model(name).eval()
    card = get_card(name)
    args = {**card["args"], "num_classes": model.num_classes, "in_chans": model.in_chans}
    ledger = {"dataset": "cifar10", "epsilon": 1.0}
    save_checkpoint(tmp_path / "m", model=model, model_name=name, model_args=args, card=card, ledger=ledger)
    loaded, sidecar = load_checkpoint(tmp_path / "m.safetensors")
    x = _input(model)
    assert torch.equal(loaded.eval()(x), model(x))
    assert sidecar["model"] == name and sidecar["ledger"] == ledger


@pytest.mark.parametrize("name", MODELS)
def test_model_info(name):
    info = zoo.model_info(name)
    model = zoo.create_model(name)
    assert info["num_params"] == sum(p.numel() for p in model.parameters())
    assert info["checkpoint_status"] in ("none", "available") or info["checkpoint_status"].startswith(
        "only non-private checkpoints")  # a public backbone is not a default (zoo.catalog.registry.checkpoint_entry)
    assert info["recipe"]["delta"] < 1 / 1000


def _one_card_per_test_family() -> list[str]:
    """Every ``test-*`` card, and the first card of each family that has none."""
    chosen = [n for n in MODELS if n.startswith("test-")]
    covered = {zoo.model_info(n)["family"] for n in chosen}
    for name in MODELS:
        if zoo.model_info(name)["family"] not in covered:
            chosen.append(name)
            covered.add(zoo.model_info(name)["family"])
    return sorted(chosen)


@pytest.mark.parametrize("name", _one_card_per_test_family())
def test_model_works_in_opacus_own_make_private(name):
    """A user's own opacus pipeline takes every zoo model unchanged: ``PrivacyEngine.make_private`` (hooks mode,
    opacus' strict validation: no trainable layer with buffers) accepts it, and the per-sample gradients it
    computes equal zoo's (float64, 1e-8 relative)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = zoo.create_model(name).double()
    x = _input(model, batch=3, dtype=torch.float64)
    y = _targets(model, 3, x.shape[-1])
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    ours = zoo.per_sample_gradients(twin, x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    private, _, _ = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                 data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                 poisson_sampling=False, loss_reduction="sum",
                                                 grad_sample_mode="hooks")
    torch.manual_seed(0)
    task_of(model).loss(private(x), y).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            err = (p.grad_sample - ours[n]).norm() / ours[n].norm().clamp_min(1e-30)
            assert err < 1e-8, f"{n}: opacus and zoo differ by {err:.2e}"
