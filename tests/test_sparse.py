"""L0 gates (Louizos et al. 2018) under DP, and pruning into physically smaller networks."""
from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.dp.step import dp_gradients
from zoo.dp.grad_sample import PerSampleGradients
from zoo.nn.sparse import (BETA, GAMMA, ZETA, HardConcreteGate, expected_cost, expected_l0, gate_modules,
                           optimizer_groups, penalty_gradients, penalty_weight)

SPARSE = [n for n in zoo.list_models() if zoo.catalog.registry.get_card(n)["args"].get("l0")]


def test_gate_formulas():
    gate = HardConcreteGate(5, drop_rate=0.3)
    assert torch.allclose(gate.log_alpha, torch.full((5,), math.log(0.7 / 0.3)))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-9.0, -1.0, 0.0, 1.0, 9.0]))
    gate.eval()
    z = gate.gates()[0]
    ref = (torch.sigmoid(gate.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    assert torch.equal(z, ref) and z[0] == 0 and z[-1] == 1
    assert torch.allclose(expected_l0(gate), torch.sigmoid(gate.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum())
    gate.train()
    torch.manual_seed(0)
    draws = gate.gates(4000)
    assert ((draws >= 0) & (draws <= 1)).all()
    assert (draws[:, 0] == 0).float().mean() > 0.99 and (draws[:, -1] == 1).float().mean() > 0.99
    assert 0 < (draws[:, 2] == 0).float().mean() < 0.5  # log_alpha = 0: closed sometimes, not mostly


def test_gate_per_sample_gradients_exact():
    """The hard-concrete grad sampler against one-sample-at-a-time autograd with the same draws."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        gate = HardConcreteGate(6)
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), gate, torch.nn.Flatten(),
                                    torch.nn.Linear(6 * 25, 3)).double()
        x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
        torch.manual_seed(1)
        grads = zoo.per_sample_gradients(model, x, y)
        torch.manual_seed(1)
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        for i in range(4):
            ref = torch.autograd.grad(losses[i], [gate.log_alpha], retain_graph=True)[0]
            assert ref.abs().sum() > 0
            assert torch.allclose(grads["1.log_alpha"][i], ref, rtol=1e-9, atol=1e-12)


def test_a_gate_scale_is_dp_sgd_on_log_alpha_over_k():
    """Gate scale k: the per-sample gradients that DP-SGD clips are those of theta = log_alpha / k (autograd through
    log_alpha = k theta, same draws), the penalty's too, and stepping log_alpha with the optimizer groups is SGD with
    momentum on theta, step for step."""
    k = 10.0
    torch.manual_seed(0)
    gate = HardConcreteGate(6, scale=k)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), gate, torch.nn.Flatten(),
                                torch.nn.Linear(6 * 25, 3)).double()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    grads = zoo.per_sample_gradients(model, x, y)
    theta = (gate.log_alpha.detach() / k).requires_grad_()
    params = {n: p.detach() for n, p in model.named_parameters()}
    torch.manual_seed(1)  # the same gate draws
    out = torch.func.functional_call(model, {**params, "1.log_alpha": k * theta}, (x,))
    losses = torch.nn.functional.cross_entropy(out, y, reduction="none")
    for i in range(4):
        ref = torch.autograd.grad(losses[i], [theta], retain_graph=True)[0]
        assert ref.abs().sum() > 0
        assert torch.allclose(grads["1.log_alpha"][i], ref, rtol=1e-9, atol=1e-12)
    # the penalty: d/dtheta = k d/dlog_alpha
    model[1].scale = 1.0
    plain = penalty_gradients(model, 0.01)[gate.log_alpha]
    model[1].scale = k
    assert torch.allclose(penalty_gradients(model, 0.01)[gate.log_alpha], k * plain)
    # the optimizer: log_alpha at k times the lr is SGD (momentum 0.9) on theta
    groups = optimizer_groups(model)
    assert [g["lr_scale"] for g in groups] == [1.0, k] and groups[1]["params"] == [gate.log_alpha]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    for g in opt.param_groups:
        g["lr"] = 0.1 * g["lr_scale"]
    th = torch.nn.Parameter(gate.log_alpha.detach() / k)
    ref_opt = torch.optim.SGD([th], lr=0.1, momentum=0.9)
    for step in range(3):
        g = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))  # a gradient wrt theta
        gate.log_alpha.grad, th.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        assert torch.allclose(gate.log_alpha, k * th, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="scale must be > 0"):
        HardConcreteGate(3, scale=0.0)


def test_training_with_a_gate_scale_moves_the_gates_k_squared_as_far(data_dir, tmp_path):
    """zoo.train with l0_gate_scale k, one step without noise or active clipping, the same seed: every gate's
    log_alpha moves k^2 times as far as with k = 1 (k for the gradient of theta, k for the step), every other
    parameter alike; the checkpoint records k."""
    from zoo.catalog.registry import load_checkpoint

    def run(k):
        r = zoo.train("test-wrn10-1-l0", data_dir=data_dir, out_dir=tmp_path / f"k{k:g}", seed=0, steps=1,
                      batch_size=16, physical_batch_size=16, epsilon=math.inf, clip_norm=1e9, momentum=0.0,
                      ema_decay=0.0, test_subset=20, progress=False, model_args={"l0_gate_scale": k})
        return r["model_object"], load_checkpoint(r["checkpoint"])[1]

    (one, _), (four, side) = run(1.0), run(4.0)
    assert side["args"]["l0_gate_scale"] == 4.0 and {g.scale for g in gate_modules(four)} == {4.0}
    init = dict(zoo.create_model("test-wrn10-1-l0").named_parameters())  # log_alpha starts from the drop rate
    moved = 0
    for (n, a), (_, b) in zip(one.named_parameters(), four.named_parameters()):
        if n.endswith("log_alpha"):
            da, db = a.detach() - init[n].detach(), b.detach() - init[n].detach()
            assert torch.allclose(db, 16 * da, rtol=1e-3, atol=1e-7), n
            moved += int(da.abs().max() > 0)
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n
    assert moved > 0


def test_dp_update_is_clip_and_noise_of_the_data_gradients_plus_the_penalty_gradient():
    """The step gradient equals (sum of clipped per-sample gradients + N(0, (sigma C)^2)) / B, computed here
    by hand, plus the gradient of (lambda / N) * sum_g cost_g P(open_g), which is the same whatever the data."""
    torch.manual_seed(0)
    model = zoo.create_model("test-wrn10-1-l0").double()
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 5])
    clip, sigma, expected = 0.5, 0.7, 8.0
    weight = penalty_weight(model, 1000)  # lambda / N for a training set of 1000
    assert weight == model.l0_lambda / 1000 > 0
    psg = PerSampleGradients(model)

    def step(xb, yb):
        torch.manual_seed(3)
        return dp_gradients(psg, [(xb, yb)], clip_norm=clip, sigma=sigma, expected_batch=expected, views=1,
                            noise_generator=torch.Generator().manual_seed(7), penalty_weight=weight)[0]

    got = step(x, y)
    torch.manual_seed(3)
    per = psg(x, y)[0]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per.values()], 1).norm(dim=1)
    factor = torch.clamp(clip / (norms + 1e-6), max=1.0)
    noise = torch.Generator().manual_seed(7)
    penalty = {n: torch.zeros_like(p) for n, p in psg.params.items()}
    costs = {g.log_alpha: g.cost for g in gate_modules(model)}
    for n, p in psg.params.items():
        if n.endswith("log_alpha"):  # d/dla of w * cost * sigmoid(la - beta log(-gamma/zeta))
            s = torch.sigmoid(p.detach() - BETA * math.log(-GAMMA / ZETA))
            penalty[n] = weight * costs[p] * s * (1 - s)
    for n, g in per.items():
        summed = (factor.view(-1, *[1] * (g.dim() - 1)) * g).sum(0)
        noisy = summed + sigma * clip * torch.randn(summed.shape, generator=noise, dtype=summed.dtype)
        assert torch.allclose(got[n], noisy / expected + penalty[n], rtol=1e-10, atol=1e-12), n
    # the penalty part reads no data: other data change every coordinate's data part, never the penalty's
    pen = {p: g for p, g in penalty_gradients(model, weight).items()}
    assert len(pen) == len(gate_modules(model))
    for gate in gate_modules(model):
        name = next(n for n, p in psg.params.items() if p is gate.log_alpha)
        assert torch.allclose(pen[gate.log_alpha], penalty[name])
    psg.close()


def _close_some(model, seed=0):
    """Random log_alpha with about a third of the channel gates shut, every channel of two blocks shut (one of them
    strided: its constant branch must take the shortcut's smaller size) and one branch gate shut, so that every
    pruning case is exercised."""
    g = torch.Generator().manual_seed(seed)
    gates = [m for m in model.modules() if isinstance(m, HardConcreteGate)]
    channel = [m for m in gates if m.log_alpha.numel() > 1]
    with torch.no_grad():
        for m in gates:
            m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=g) * 3)
        channel[0].log_alpha.fill_(-10.0)  # a whole block's channels closed
        channel[len(channel) // 3].log_alpha.fill_(-10.0)  # and a strided one's (the first block of stage 2)
        branch = [m for m in gates if m.log_alpha.numel() == 1]
        if branch:
            for m in branch:
                m.log_alpha.fill_(2.0)
            branch[-1].log_alpha.fill_(-10.0)  # one residual branch closed
        for p in model.parameters():  # a trained-looking affine
            if p.dim() == 1 and not any(p is m.log_alpha for m in gates):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", SPARSE)
def test_prune_gives_a_smaller_network_with_the_same_outputs(name):
    model = zoo.create_model(name)
    _close_some(model)
    card = zoo.catalog.registry.get_card(name)
    small, report = zoo.prune(model, input_size=tuple(card["input_size"]))
    assert not gate_modules(small) and gate_modules(model)  # the original keeps its gates
    assert report["params_after"] < report["params_before"] and report["flops_after"] < report["flops_before"]
    assert report["params_after"] == sum(p.numel() for p in small.parameters())
    x = torch.randn(4, *card["input_size"])
    with torch.no_grad():
        assert torch.allclose(small(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert zoo.validate_model(small) is small
    # a plain network of the family: the report's arguments build it, and its weights load into that build
    rebuilt = zoo.catalog.registry.build({**card, "args": report["args"]})
    rebuilt.load_state_dict(small.state_dict())
    assert not gate_modules(rebuilt) and torch.equal(rebuilt.eval()(x), small(x))
    kept = report["kept"]
    assert kept[0]["channels"] == 0 and any(0 < k["channels"] < k["of"] for k in kept)


def test_prune_refuses_models_it_cannot_prune():
    with pytest.raises(ValueError, match="no L0 gates"):
        zoo.prune(zoo.create_model("test-wrn10-1"))
    with pytest.raises(TypeError, match="no pruner registered"):
        zoo.prune(zoo.create_model("test-resnet9-w8"))


def test_each_gate_costs_the_parameters_it_removes():
    """A gate's cost is what zoo.prune removes when it closes: closing one channel gate of a block removes exactly
    ``cost`` parameters from the pruned network, and a closed branch gate its whole branch's."""
    torch.manual_seed(0)
    model = zoo.create_model("test-wrn10-1-l0", l0_blocks=True)
    full = sum(p.numel() for n, p in zoo.prune(model)[0].named_parameters())
    channel = next(g for g in gate_modules(model) if g.log_alpha.numel() > 1)
    with torch.no_grad():
        channel.log_alpha[0] = -10.0  # closed at test time
    one_less = sum(p.numel() for p in zoo.prune(model)[0].parameters())
    assert full - one_less == channel.cost
    assert float(expected_cost(model).detach()) == pytest.approx(sum(g.cost * float(g.expected_l0().detach()) for g in gate_modules(model)))
    branch = next(g for g in gate_modules(model) if g.log_alpha.numel() == 1)
    with torch.no_grad():
        channel.log_alpha[0] = 5.0
        branch.log_alpha.fill_(-10.0)
    assert full - sum(p.numel() for p in zoo.prune(model)[0].parameters()) == branch.cost
