"""Gradient self-alignment (zoo.dp.alignment): the privacy claim (each contribution reads only its sample and public
values, so removing one sample moves the clipped sum by at most C), exactness, the variants and the engine's use of
the public reference."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.dp.alignment import (REFERENCE_DECAY, AlignedPerSampleGradients, AlignSettings, subset_masks)
from zoo.dp.step import clip_per_sample
from zoo.dp.grad_sample import PerSampleGradients
from zoo.data.tasks import task_of

from test_models import MODELS, _input, _targets
from test_train import QUIET, _interrupted_run_resumes_exactly


def _test_cards_and_untested_families() -> list[str]:
    """Every test card (each family has one, the L0-gated WRN apart from the plain one), and the first card of any
    family without one: a new family is tested the moment it is registered, and the double backward stays cheap
    (the cards of a family share its code)."""
    chosen = [n for n in MODELS if n.startswith("test-")]
    covered = {zoo.model_info(n)["family"] for n in chosen}
    for name in MODELS:
        family = zoo.model_info(name)["family"]
        if family not in covered:
            chosen.append(name)
            covered.add(family)
    return sorted(chosen)


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def _random_reference(params, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}


def _aligned_loss_by_autograd(model, x, y, ref, weight, mask=None):
    """The self-aligned loss of one sample (its views ``x``), written directly with autograd (double backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = task_of(model).loss(model(x), y).mean()
    g = torch.autograd.grad(loss, params, create_graph=True)
    m = mask or [torch.ones_like(r) for r in ref]
    gm = [gi * mi for gi, mi in zip(g, m)]
    rm = [ri * mi for ri, mi in zip(ref, m)]
    dot = sum((a * b).sum() for a, b in zip(gm, rm))
    cos = dot / (torch.sqrt(sum((a ** 2).sum() for a in gm)) * torch.sqrt(sum((b ** 2).sum() for b in rm)))
    return loss + weight * (1 - cos)


@pytest.mark.parametrize("name", _test_cards_and_untested_families())
def test_each_contribution_reads_only_its_sample_and_sensitivity_is_C(name):
    """With alignment on (subset and all): sample i's gradient is the same alone as in the batch (it reads no other
    sample), it is the exact gradient of its self-aligned loss (double backward, float64), it differs from the plain
    gradient, and removing any one sample changes the sum of clipped contributions by at most C."""
    model = zoo.create_model(name).double().eval()  # eval: random layers (L0 gates) draw nothing
    views, b, clip = 2, 3, 1e-3  # C far below the gradient norms, so every contribution is clipped
    x = _input(model, batch=b * views, dtype=torch.float64)
    y = _targets(model, b * views, x.shape[-1])
    g_plain = AlignedPerSampleGradients(model, AlignSettings("all"))(x, y, views=views)[0]  # no reference: plain
    for mode in ("subset", "all"):
        psg = AlignedPerSampleGradients(model, AlignSettings(mode, weight=2.0, fraction=0.3))
        ref = _random_reference(psg.params)
        psg.set_reference(ref)
        grads = psg(x, y, views=views)[0]
        assert not torch.allclose(_flat(grads), _flat(g_plain)), "the alignment term changed nothing"
        for i in range(b):
            alone = psg(x[i * views:(i + 1) * views], y[i * views:(i + 1) * views], views=views)[0]
            torch.testing.assert_close(_flat(alone)[0], _flat(grads)[i], rtol=1e-9, atol=1e-12)
        full = clip_per_sample(grads, clip)[0]
        for j in range(b):
            keep = [i for i in range(b) if i != j]
            rest = clip_per_sample({n: g[keep] for n, g in grads.items()}, clip)[0]
            delta = torch.cat([(full[n] - rest[n]).flatten() for n in full]).norm()
            assert delta <= clip * (1 + 1e-6)
            assert delta >= clip * (1 - 1e-5)  # a clipped contribution has norm C here (up to clip's 1e-6)
    # exactness of the per-sample Hessian-vector product: sample 0, subset mode, against double backward
    psg = AlignedPerSampleGradients(model, AlignSettings("subset", weight=2.0, fraction=0.3))
    ref = _random_reference(psg.params)
    psg.set_reference(ref)
    got = psg(x[:views], y[:views], views=views)[0]
    masks = subset_masks(ref, 0.3)
    names = list(psg.params)
    loss = _aligned_loss_by_autograd(model, x[:views], y[:views], [ref[n] for n in names], 2.0,
                                     [masks[n].view_as(ref[n]).double() for n in names])
    want = torch.autograd.grad(loss, list(psg.params.values()))
    for n, w in zip(names, want):
        torch.testing.assert_close(got[n][0], w, rtol=1e-7, atol=1e-10, msg=n)


def test_without_reference_it_is_the_plain_per_sample_gradient():
    model = zoo.create_model("test-wrn10-1").double()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    plain = PerSampleGradients(model)
    want = plain(x, y, views=2)[0]
    plain.close()
    psg = AlignedPerSampleGradients(model, AlignSettings("all"))
    for reference in (None, {n: torch.zeros_like(p) for n, p in psg.params.items()}):
        psg.set_reference(reference)
        torch.testing.assert_close(_flat(psg(x, y, views=2)[0]), _flat(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["all", "subset"])
def test_a_step_on_the_alignment_term_raises_each_samples_cosine(mode):
    """The term's gradient points the right way: a small step against it raises cos(m g_i, m r) for every sample."""
    model = zoo.create_model("test-wrn10-1", num_classes=2, in_chans=1).double().eval()
    x, y = torch.randn(4, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    psg = AlignedPerSampleGradients(model, AlignSettings(mode, weight=1.0, fraction=0.2))
    ref = _random_reference(psg.params)
    masks = subset_masks(ref, 0.2) if mode == "subset" else {n: torch.ones(r.numel(), dtype=torch.bool)
                                                             for n, r in ref.items()}
    m = torch.cat([masks[n] for n in ref]).double()
    r = torch.cat([v.flatten() for v in ref.values()]) * m

    def cosines():
        g = _flat(psg(x, y)[0])  # no reference set: plain gradients
        return torch.nn.functional.cosine_similarity(g * m, r[None])

    psg.set_reference(None)
    plain = psg(x, y)[0]
    before = cosines()
    psg.set_reference(ref)
    term = _flat(psg(x, y)[0]) - _flat(plain)  # gradient of lambda * (1 - cos) per sample
    for i in range(len(x)):
        saved = [p.detach().clone() for p in psg.params.values()]
        with torch.no_grad():
            step = 1e-3 * term[i] / term[i].norm()
            offset = 0
            for p in psg.params.values():
                p -= step[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        psg.set_reference(None)
        assert cosines()[i] > before[i]
        with torch.no_grad():
            for p, s in zip(psg.params.values(), saved):
                p.copy_(s)


def test_subset_rule_takes_the_largest_public_coordinates_ties_to_lower_index():
    ref = {"a": torch.tensor([0.5, -3.0, 1.0]), "b": torch.tensor([[1.0, 0.2], [-1.0, 0.0]])}
    masks = subset_masks(ref, 0.5)  # ceil(0.5 * 7) = 4 coordinates: |-3|, then 1, 1, -1 in index order, then 0.5
    assert masks["a"].tolist() == [False, True, True] and masks["b"].tolist() == [True, False, True, False]
    assert sum(int(m.sum()) for m in subset_masks(ref, 1e-9).values()) == 1


def test_bad_settings_are_refused_before_any_data_is_loaded(tmp_path):
    for kw, match in [({"align": "sideways"}, "align must be one of"), ({"align": "subset", "align_fraction": 0.0},
                      "align_fraction"), ({"align": "all", "align_weight": -1.0}, "align_weight")]:
        with pytest.raises(ValueError, match=match):
            zoo.train("test-wrn10-1", data_dir=tmp_path / "nothing-here", **kw, **QUIET)


def test_engine_reference_is_the_ema_of_released_updates(data_dir, tmp_path):
    """After one step (momentum 0) the saved reference is (1 - beta) * u_1, u_1 = (theta_0 - theta_1) / lr: the
    released noisy update and nothing else; after the second it is beta r_1 + (1 - beta) u_2."""
    kw = dict(data_dir=data_dir, seed=11, steps=2, checkpoint_every=1, test_subset=50, dataset="pneumoniamnist",
              batch_size=32, physical_batch_size=16, align="subset", delta=1e-4, momentum=0.0, lr=0.5, **QUIET)
    out = tmp_path / "run"
    zoo.train("test-wrn10-1", out_dir=out, **kw)
    torch.manual_seed(11)
    theta0 = dict(zoo.create_model("test-wrn10-1", num_classes=2, in_chans=1).named_parameters())
    step1, step2 = load_file(out / "step-000001.safetensors"), load_file(out / "step-000002.safetensors")
    r1 = {}
    for name, p0 in theta0.items():
        u1 = (p0.detach() - step1[f"model.{name}"]) / 0.5
        r1[name] = step1[f"optim.{name}.align_reference"]
        torch.testing.assert_close(r1[name], (1 - REFERENCE_DECAY) * u1, rtol=1e-4, atol=1e-6)
        u2 = (step1[f"model.{name}"] - step2[f"model.{name}"]) / 0.5
        torch.testing.assert_close(step2[f"optim.{name}.align_reference"],
                                   REFERENCE_DECAY * r1[name] + (1 - REFERENCE_DECAY) * u2, rtol=1e-4, atol=1e-6)
    final = load_file(out / "final.safetensors")
    assert not any(k.startswith("optim.") for k in final)  # the released checkpoint holds the EMA weights only


def test_aligned_run_resumes_exactly_and_differs_from_plain(data_dir, tmp_path):
    kw = dict(data_dir=data_dir, seed=4, steps=4, checkpoint_every=2, test_subset=50, dataset="pneumoniamnist",
              batch_size=16, physical_batch_size=16, delta=1e-4, **QUIET)
    a, _, aligned = _interrupted_run_resumes_exactly("test-wrn10-1", tmp_path, align="subset", **kw)
    assert a["recipe"]["align"] == "subset" and math.isclose(a["ledger"]["epsilon"], zoo.train(
        "test-wrn10-1", out_dir=tmp_path / "plain", **kw)["ledger"]["epsilon"])  # same privacy cost
    plain = load_file(tmp_path / "plain" / "final.safetensors")
    assert any(not torch.equal(plain[k], aligned[k]) for k in plain)
