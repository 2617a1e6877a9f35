"""Equivariant models: logits invariant under the group's exact grid actions; field GroupNorm equivariant."""
from __future__ import annotations

import pytest
import torch

import zoo
from zoo.nn.equivariant import FieldGroupNorm, FieldNorm, field_norm_layer
from zoo.catalog.registry import get_card

EQ_MODELS = [n for n in zoo.list_models() if get_card(n)["family"].startswith("eq-")]
EQ_CLASSIFIERS = [n for n in EQ_MODELS if zoo.model_info(n)["task"] == "classification"]
EQ_SEGMENTERS = [n for n in EQ_MODELS if zoo.model_info(n)["task"] == "segmentation"]


def grid_actions(group: str):
    """The non-trivial actions of ``group`` that map the pixel grid onto itself: rotations by multiples of 90
    degrees that lie in C_N, and for D_N the flips composed with them."""
    n = int(group[1:])
    ks = (1, 2, 3) if n % 4 == 0 else (2,) if n % 2 == 0 else ()
    rots = [lambda x, k=k: x.rot90(k, (2, 3)) for k in ks]
    flips = [lambda x, k=k: x.rot90(k, (2, 3)).flip(3) for k in (0, *ks)] if group[0] == "d" else []
    return rots + flips


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", EQ_CLASSIFIERS)
def test_logits_invariant_under_grid_actions(name, mode):
    """At the card's input size, and in eval mode at the next smaller size the model accepts (its
    ``size_multiple`` is what makes every accepted size exact: eq-resnet9 at 28x28 was not, and now refuses it)."""
    model = zoo.create_model(name)
    model.train(mode == "train")
    c, s, _ = zoo.model_info(name)["input_size"]
    smaller = s - model.size_multiple
    for size in (s, smaller) if mode == "eval" and smaller >= max(model.min_size, 16) else (s,):
        x = torch.randn(2, c, size, size)
        with torch.no_grad():
            ref = model(x)
            actions = grid_actions(model.invariance_group)
            assert actions
            for act in actions:
                assert torch.allclose(model(act(x)), ref, atol=1e-4, rtol=1e-4), size
    if model.size_multiple > 1:
        with pytest.raises(ValueError, match=f"divisible by {model.size_multiple}"):
            model(torch.randn(1, c, s + model.size_multiple // 2, s + model.size_multiple // 2))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", EQ_SEGMENTERS)
def test_masks_transform_with_the_input_under_grid_actions(name, mode):
    """Equivariant segmenters: model(g x) = g model(x) for every grid action g of the group (per pixel)."""
    model = zoo.create_model(name)
    model.train(mode == "train")
    s = 2 * model.size_multiple
    x = torch.randn(2, model.in_chans, s, s)
    with torch.no_grad():
        ref = model(x)
        actions = grid_actions(model.equivariance_group)
        assert actions and ref.shape[-2:] == (s, s)
        for act in actions:
            assert torch.allclose(model(act(x)), act(ref), atol=1e-4, rtol=1e-4)
        if model.equivariance_group[0] == "c":  # rotations only: a flip is not a symmetry of the model
            assert not torch.allclose(model(x.flip(3)), ref.flip(3), atol=1e-3)


def test_grid_actions_are_the_groups():
    assert len(grid_actions("d4")) == 7 and len(grid_actions("c4")) == 3
    assert len(grid_actions("d2")) == 3 and len(grid_actions("c2")) == 1 and len(grid_actions("c8")) == 3


def test_restricted_model_is_not_claimed_invariant_under_the_full_group():
    """D4 restricted to D2 in the last stage: 90-degree rotations are not symmetries of the logits."""
    model = zoo.create_model("eq-resnet9-d4").eval()
    assert model.invariance_group == "d2"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x.rot90(1, (2, 3))), model(x), atol=1e-4)


@pytest.mark.parametrize("kind", ["fieldgroupnorm", "fieldnorm"])
def test_plain_groupnorm_affine_would_break_equivariance_but_field_norms_do_not(kind):
    """Permuting the channels inside every field (the group action on regular fields) commutes with
    FieldGroupNorm and FieldNorm, with a trained (non-trivial) affine; neither mixes samples."""
    fields, size = 6, 8
    norm = field_norm_layer(kind, num_groups=3)(fields, size)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(2, fields * size, 5, 5)
    perm = torch.randperm(size)
    permute = lambda t: t.view(2, fields, size, 5, 5)[:, :, perm].reshape(2, -1, 5, 5)  # noqa: E731
    assert torch.allclose(norm(permute(x)), permute(norm(x)), atol=1e-6)
    assert torch.allclose(norm(x[:1]), norm(x)[:1], atol=1e-6)  # per sample: the batch does not matter
    plain = torch.nn.GroupNorm(3, fields * size)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2.0)
    assert not torch.allclose(plain(permute(x)), permute(plain(x)), atol=1e-3)


@pytest.mark.parametrize("name", EQ_MODELS)
def test_export_gives_plain_layers_and_the_same_outputs(name):
    from zoo.nn.equivariant import R2Conv

    model = zoo.create_model(name).eval()
    with torch.no_grad():  # a trained-looking affine, so the export of the field-tied parameters is tested
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = zoo.export(model)
    kinds = {type(m).__module__.split(".")[0] for m in plain.modules()}
    assert "escnn" not in kinds and not any(isinstance(m, (R2Conv, FieldGroupNorm)) for m in plain.modules())
    x = torch.randn(2, model.in_chans, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert zoo.validate_model(plain) is plain


@pytest.mark.parametrize("name", ["test-eq-resnet9-c4", "test-eq-wrn10-1-d4"])
def test_per_sample_gradients_match_whole_model_torch_func(name):
    """Independent check of the basis-projection route: torch.func's vmap(grad) over the whole model (the
    route of Hölzl et al.'s code), in float64."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    model = zoo.create_model(name).double()
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 3, 7])
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),), tie_weights=False)
        return F.cross_entropy(out, yi.unsqueeze(0))

    ref = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    ours = zoo.per_sample_gradients(model, x, y)
    assert ours.keys() == ref.keys()
    for k in ours:
        assert torch.allclose(ours[k], ref[k], rtol=1e-8, atol=1e-12), k


@pytest.mark.parametrize("types", ["trivial->regular", "regular->regular", "mixed->regular", "regular->mixed"])
def test_coefficient_projection_matches_vjp_of_the_basis_expansion(types):
    """The strided fast path (one contiguous basis block) and the vmap(vjp) fallback (several blocks) both equal
    the adjoint of escnn's basis expansion applied to each sample's filter gradient."""
    from escnn import nn as enn

    from zoo.nn.equivariant import R2Conv, gspace, regular_type, trivial_type

    gs = gspace("d4")
    mixed = enn.FieldType(gs, [gs.regular_repr] * 2 + [gs.trivial_repr] * 3)
    in_type, out_type = {"trivial->regular": (trivial_type(gs, 3), regular_type(gs, 5)),
                         "regular->regular": (regular_type(gs, 3), regular_type(gs, 4)),
                         "mixed->regular": (mixed, regular_type(gs, 2)),
                         "regular->mixed": (regular_type(gs, 2), mixed)}[types]
    layer = R2Conv(in_type, out_type).double()
    assert (layer.basis_t is not None) == (types in ("trivial->regular", "regular->regular"))
    gf = torch.randn(4, out_type.size, in_type.size, 3, 3, dtype=torch.float64)
    ours = layer.coefficient_grads(gf)
    for n in range(4):
        _, vjp = torch.func.vjp(layer.expand_filter, layer.weights.detach())
        assert torch.allclose(ours[n], vjp(gf[n])[0], rtol=1e-10, atol=1e-12)


def test_field_norm_statistics_are_per_field_and_position():
    """FieldNorm: each field of each sample has mean 0 and mean square 1 over its channels at every position."""
    norm = FieldNorm(4, 8, affine=False, eps=0.0)
    y = norm(torch.randn(3, 32, 5, 5) * 3 + 1).view(3, 4, 8, 5, 5)
    assert torch.allclose(y.mean(2), torch.zeros(()), atol=1e-5)
    assert torch.allclose(y.pow(2).mean(2), torch.ones(()), atol=1e-4)


def test_unknown_or_batch_field_norm_is_refused():
    for name in ("batchnorm", "innerbatchnorm", "fieldbatchnorm"):
        with pytest.raises(ValueError, match="per-sample"):
            field_norm_layer(name)


@pytest.mark.parametrize("name", ["test-eq-resnet9-c4", "test-eq-wrn10-1-d4"])
def test_fieldnorm_option_is_invariant_exact_and_exports(name):
    """The FieldNorm option (``norm='fieldnorm'``): invariant logits in train mode, exact per-sample gradients
    (float64, against one sample at a time), and an export with the same outputs."""
    import torch.nn.functional as F

    model = zoo.create_model(name, norm="fieldnorm", affine=True)
    assert any(isinstance(m, FieldNorm) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for act in grid_actions(model.invariance_group):
            assert torch.allclose(model(act(x)), model(x), atol=1e-4, rtol=1e-4)
        assert torch.allclose(zoo.export(model)(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    model = model.double().train()
    xd, y = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([2, 5])
    grads = zoo.per_sample_gradients(model, xd, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(xd[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            assert torch.allclose(grads[n][i], p.grad, rtol=1e-8, atol=1e-12), n


def test_escnn_disk_cache_follows_zoo_cache(tmp_path, monkeypatch):
    """escnn's joblib stores (by default in its install directory, unwritable in a read-only install) are
    moved under ZOO_CACHE, and what escnn computes for a new group lands there."""
    import escnn.group._clebsh_gordan as cg

    from zoo.nn.equivariant import relocate_escnn_cache

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    try:
        assert relocate_escnn_cache() == tmp_path / "escnn"
        assert cg.cache.store_backend.location == str(tmp_path / "escnn" / "joblib")
        zoo.create_model("test-eq-resnet9-c4", group="d6", layout=(4, 4, 8))  # D6 -> D3: new CG coefficients
        assert any((tmp_path / "escnn" / "joblib").rglob("output.pkl"))
        assert any((tmp_path / "escnn").glob("he-*.npy"))
    finally:
        monkeypatch.undo()
        relocate_escnn_cache()
