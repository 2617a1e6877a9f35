"""The scattering front end (zoo.nn.layers.Scattering2D) against kymatio, its memo, and ScatterNet training."""
from __future__ import annotations

import contextlib

import pytest
import torch

import zoo
import zoo.training.engine
from zoo.nn.layers import _MEMO as layers_memo
from zoo.nn.layers import Scattering2D, memoized_fixed_layers

from kymatio.scattering2d.frontend import torch_frontend as kymatio_frontend  # noqa: E402  (a dependency)


@pytest.mark.parametrize("J,h,w", [(2, 32, 32), (2, 28, 28), (2, 16, 24), (3, 32, 32), (1, 8, 12)])
def test_scattering_equals_kymatio(J, h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    ref = kymatio_frontend.ScatteringTorch2D(J=J, shape=tuple(x.shape[-2:]), L=8).double()(x)
    out = Scattering2D(J, 8)(x)
    layer = Scattering2D(J, 8)
    assert out.shape == (2, 3 * layer.coefficients, x.shape[2] // 2 ** J, x.shape[3] // 2 ** J)
    assert torch.allclose(out, ref.reshape(out.shape), rtol=0, atol=1e-12)


def test_scattering_refuses_sizes_it_cannot_take():
    with pytest.raises(ValueError, match="multiples of 4"):
        Scattering2D(2)(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match="at least 8"):
        Scattering2D(2)(torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="J >= 1"):
        Scattering2D(0)


def test_scatternet_keeps_no_filters_in_its_weights():
    model = zoo.create_model("scatternet-cnn")
    model(torch.randn(1, 3, 32, 32))  # builds the filters for 32x32
    assert not [k for k in model.state_dict() if k.startswith("scattering")]
    assert sum(p.numel() for p in model.scattering.parameters()) == 0


PER_SAMPLE = 243 * 8 * 8 * 4  # bytes of one 3x32x32 image's scattering (float32)


def test_memo_returns_the_layer_outputs_is_bounded_and_nests():
    model = zoo.create_model("scatternet-cnn").eval()
    other = zoo.create_model("scatternet-cnn").eval()
    x = torch.randn(6, 3, 32, 32)
    plain = model.scattering.transform(x)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731  (FFTs of other batch sizes)
    with memoized_fixed_layers(4 * PER_SAMPLE):
        first = model.scattering(x)
        assert layers_memo["bytes"] == 4 * PER_SAMPLE  # bounded
        again = other.scattering(x[[5, 0, 2]])  # another model shares it: two remembered, one not
        assert close(first, plain) and close(again, plain[[5, 0, 2]])
        assert close(model.scattering(x + 1), model.scattering.transform(x + 1))  # other inputs: computed
        with memoized_fixed_layers(0):  # off inside, kept for the outer block
            assert close(model.scattering(x), plain) and layers_memo["bytes"] == 4 * PER_SAMPLE
        with memoized_fixed_layers(2 * PER_SAMPLE):  # an inner block does not lower the outer budget
            assert layers_memo["max_bytes"] == 4 * PER_SAMPLE
    assert layers_memo["bytes"] == 0 and not layers_memo["store"] and not layers_memo["max_bytes"]  # dropped


def test_memo_keeps_the_graph_after_the_layer_and_gives_the_input_no_gradient():
    model = zoo.create_model("scatternet-cnn").double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    ref = zoo.per_sample_gradients(model, x, y)
    with memoized_fixed_layers(10 * PER_SAMPLE * 2):
        got = zoo.per_sample_gradients(model, x, y)
        assert layers_memo["bytes"] > 0  # the memo was used, inside the per-sample gradient computation
        xg = x.clone().requires_grad_(True)
        model(xg).sum().backward()
        assert xg.grad is None and model.head.weight.grad is not None
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-9, atol=1e-12), name


def test_scatternet_training_is_the_same_with_and_without_the_memo(data_dir, tmp_path, monkeypatch):
    kw = dict(data_dir=data_dir, seed=0, train_subset=300, batch_size=60, physical_batch_size=32, steps=3,
              epsilon=8.0, augmult=1, test_subset=100, progress=False)
    calls = []
    transform = Scattering2D.transform
    monkeypatch.setattr(Scattering2D, "transform", lambda self, x: calls.append(len(x)) or transform(self, x))
    a = zoo.train("scatternet-cnn", out_dir=tmp_path / "a", **kw)
    with_memo = sum(calls)
    monkeypatch.setattr(zoo.training.engine, "memoized_fixed_layers", lambda n: contextlib.nullcontext())
    calls.clear()
    b = zoo.train("scatternet-cnn", out_dir=tmp_path / "b", **kw)
    assert with_memo < sum(calls)  # the memo saved transforms of samples seen before
    wa, wb = a["model_object"].state_dict(), b["model_object"].state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k
    assert a["test"]["accuracy"] == pytest.approx(b["test"]["accuracy"], abs=0.011)
