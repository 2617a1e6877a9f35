"""How zoo.dp.grad_sample.PerSampleGradients gets opacus' per-sample gradients: the same values as opacus' own
GradSampleModule (bit for bit, over the registry), no gradient of the data or of a fixed front end, and opacus'
accumulation where a layer is used twice."""
from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

import zoo
from zoo.dp.grad_sample import PerSampleGradients, per_sample_cross_entropy
from zoo.data.tasks import task_of

MODELS = zoo.list_models()


def _batch(model, n=2):
    m = model.size_multiple
    s = max(16, model.min_size, m) // m * m if m > 1 else max(16, model.min_size)
    x = torch.randn(n, model.in_chans, s, s)
    y = task_of(model).example_targets(n, model.num_classes, (s, s), torch.Generator().manual_seed(1))
    return x, y


@pytest.mark.parametrize("name", MODELS)
def test_same_per_sample_gradients_as_opacus_grad_sample_module(name):
    """zoo differentiates only w.r.t. the trainable layers' outputs and stores each layer's per-sample gradient
    as its sampler returns it; opacus differentiates everything and copies into a zero-filled buffer. The
    values must not differ by a single bit (random layers see the same draws: same seed)."""
    model = zoo.create_model(name).train()
    x, y = _batch(model)
    torch.manual_seed(3)
    psg = PerSampleGradients(model)
    ours = {n: g.clone() for n, g in psg(x, y)[0].items()}
    psg.close()
    ref = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    torch.manual_seed(3)
    task_of(model).loss(ref(x), y).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(ours[n], p.grad_sample), f"{n}: max difference {(ours[n] - p.grad_sample).abs().max()}"
    ref._close()


class _NoInputGradient(torch.autograd.Function):
    """The identity; its backward fails: stands for data, or a fixed front end, whose gradient nobody needs."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("the gradient of the first trainable layer's input was computed")


class _FrontEnd(nn.Module):
    def forward(self, x):
        return _NoInputGradient.apply(x)


def test_the_first_trainable_layers_input_gets_no_gradient():
    """The first trainable layer's input gradient is never computed (for a ScatterNet + CNN it was 15 % of the
    step), even when the input itself requires grad; every layer still gets its exact per-sample gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(_FrontEnd(), nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(5, 3, 6, 6, requires_grad=True), torch.tensor([0, 1, 2, 0, 1])
    psg = PerSampleGradients(model)
    grads, _, _ = psg(x, y, loss_fn=per_sample_cross_entropy)
    psg.close()
    assert x.grad is None
    plain = nn.Sequential(*list(model)[1:])
    for i in range(5):
        loss = per_sample_cross_entropy(plain(x[i:i + 1].detach()), y[i:i + 1]).sum()
        ref = torch.autograd.grad(loss, list(plain.parameters()))
        for (n, _), r in zip(plain.named_parameters(), ref):
            torch.testing.assert_close(grads[f"{int(n.split('.')[0]) + 1}.{n.split('.')[1]}"][i], r)
    assert all(p.grad is None for p in model.parameters())  # no aggregated gradient either


class _Twice(nn.Module):
    """One linear layer applied twice (tied weights): opacus accumulates its per-sample gradient over the uses."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_a_layer_used_twice_accumulates_over_its_uses():
    torch.manual_seed(0)
    model = _Twice()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    psg = PerSampleGradients(model)
    grads, _, _ = psg(x, y, loss_fn=per_sample_cross_entropy)
    psg.close()
    for i in range(6):
        loss = per_sample_cross_entropy(model(x[i:i + 1]), y[i:i + 1]).sum()
        ref = torch.autograd.grad(loss, [model.lin.weight, model.lin.bias])
        torch.testing.assert_close(grads["lin.weight"][i], ref[0])
        torch.testing.assert_close(grads["lin.bias"][i], ref[1])


def test_close_removes_every_hook():
    model = zoo.create_model("test-wrn10-1")
    before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    PerSampleGradients(model).close()
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == before


class _TwoBranches(nn.Module):
    """Two convs on the data, a layer after one of them, a shared head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.a2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(8 * 16, 3)

    def forward(self, x):
        return self.head(torch.cat([self.a2(torch.tanh(self.a(x))), torch.tanh(self.b(x))], 1).flatten(1))


def test_two_branches_from_the_data_each_get_exact_per_sample_gradients():
    """Two trainable layers read the data (the backward pass ends at both), a layer after one of them and a
    shared head: every layer still gets its exact per-sample gradient."""
    torch.manual_seed(0)
    model = _TwoBranches()
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    psg = PerSampleGradients(model)
    grads, _, _ = psg(x, y, loss_fn=per_sample_cross_entropy)
    psg.close()
    for i in range(4):
        loss = per_sample_cross_entropy(model(x[i:i + 1]), y[i:i + 1]).sum()
        for (n, p), r in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            torch.testing.assert_close(grads[n][i], r)
