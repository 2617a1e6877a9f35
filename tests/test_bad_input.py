"""Bad input everywhere gets a clear error (what is wrong, what was expected, what to do) or correct handling.

Inventory: entry point x bad input -> behaviour, and the test that holds it ("here": this file).

=========================  ==========================================  ===========================================
entry point                bad input                                   behaviour / test
=========================  ==========================================  ===========================================
zoo.create_model           unknown name (close-match suggestion)       UnknownModelError: test_registry
                                                                       ::test_unknown_model_suggests_closest,
                                                                       test_cli::test_unknown_model_is_a_clear_error
                           name not a str                              TypeError: here (test_create_model)
                           unknown kwarg (typo: suggestion)            TypeError listing the family's args: here
                           num_classes < 2 / not an int, in_chans < 1  ValueError: here
                           bad architecture value (depth, norm)        ValueError from the family: here
                           pretrained without a checkpoint             FileNotFoundError: test_registry
model forward (every       3-D input, wrong channel count, uint8,      TypeError/ValueError before any compute:
family: one card each)     float64/float16 on a float32 model, NaN,    here (test_forward_refuses); channels and
                           +-Inf, not a tensor                         uint8 of test-wrn10-1 also test_privacy
                           too small / not a multiple of the stride    ValueError: test_privacy, test_train
                           batch of size 0                             empty output of the right shape: here
model.reset_classifier     num_classes < 2                             ValueError: here
zoo.per_sample_gradients   NaN input, labels out of range, channels,   ValueError: test_privacy
                           loss_fn without one loss per sample         ::test_bad_inputs_get_clear_errors
(both tasks)               dims, dtype, NaN, Inf, float/int32 labels,  TypeError/ValueError: here
                           labels out of range, [B,1] labels, masks
                           of the wrong shape/out of range, views < 1,
                           non-tensors, float64 on a float32 model
                           check_batch alone (classification)          test_data::test_check_batch
                           empty Poisson batch                         [0, *shape] gradients: test_privacy (one
                                                                       classifier), here (every family)
                           finite input that overflows in the model    NonFiniteGradientError, naming the samples;
                           (NaN/Inf per-sample gradient)               no update applied: here
                           layer without per-sample gradient           test_validate
DP-SGD step / zoo.train    a data set whose normalisation overflows    NonFiniteGradientError before the optimizer
                                                                       step; weights unchanged; a checkpoint in
                                                                       out_dir intact, none written: here
zoo.train / zoo.finetune   unknown data set name                       UnknownDatasetError with suggestion: here
                           unknown recipe setting, bad model_args      ValueError / TypeError: here
                           task mismatch, bad crops                    ValueError: test_train
                           exhausted privacy budget                    BudgetExhaustedError: test_train,
                                                                       test_privacy
data sets                  data root unset / missing folder / files    DataNotFoundError: test_data, test_seg_data
                           corrupt or truncated archive, wrong hash    DataIntegrityError: test_data
                                                                       ::test_corrupt_archive_refused,
                                                                       test_pneumoniamnist_tampered_or_missing...,
                                                                       test_seg_data::test_tampered_*
                           unknown split                               ValueError: test_data, test_seg_data
data by path               missing path, mixed sizes, unreadable or    DataNotFoundError / BadDataError naming the
(zoo.data.folder)            16-bit image, float/NaN arrays, labels      file or index and the fix: test_path_data
                           outside the classes, empty class, too few   ::test_bad_data_gets_an_error_*,
                           images, the same image in two splits,       test_segmentation_bad_data; changed content
                           unmatched or missized masks; changed data   refused (eval, resume, composing):
                                                                       test_path_data::test_changed_data_*
register_dataset           bad num_classes/in_chans/size/mean/std      TypeError/ValueError naming the attribute:
                                                                       test_path_data::test_registering_*
ImageDataset               wrong dtype/shape/channels, labels out of   ValueError: here
                           range
SegmentationDataset        wrong dtype/shape, mask values out of range ValueError: test_seg_data
                                                                       ::test_dataset_validation
decoded-array cache        truncated file, pickle, wrong shape or      rebuilt from the verified source with a
                           dtype, labels out of range                  warning: here
model card                 unknown key, missing key, wrong type        CardError: test_registry
                           bad recipe value, unknown data set, bad     CardError naming field, value, expected:
                           input_size/num_classes/sha256, family args  here
                           invalid JSON, file name != model name       CardError: here
checkpoints                tampered/truncated weights, edited sidecar  CheckpointIntegrityError: test_checkpoint,
                           or ledger, missing files                    test_privacy, test_cli
=========================  ==========================================  ===========================================

Per-model checks run over one card of every registered family (the smallest by name among its ``test-*`` cards,
else its first card), computed from ``zoo.list_models()``: the checks live in the family's class, so a new family
is tested the moment a card registers it, without building every large model.
"""
from __future__ import annotations

import copy
import json
import re
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.data as zd
from zoo.catalog.cards import CardError, load_card, validate_card
from zoo.catalog.checkpoint import save_checkpoint
from zoo.dp.grad_sample import NonFiniteGradientError, PerSampleGradients
from zoo.catalog.registry import UnknownModelError, get_card, load_checkpoint, register_model
from zoo.data.tasks import task_of


def _one_card_per_family() -> list[str]:
    by_family: dict[str, list[str]] = {}
    for name in zoo.list_models():
        by_family.setdefault(get_card(name)["family"], []).append(name)
    return sorted(min(names, key=lambda n: (not n.startswith("test-"), n)) for names in by_family.values())


FAMILY_MODELS = _one_card_per_family()


@lru_cache(maxsize=None)
def _model(name: str):
    return zoo.create_model(name).eval()


def _size(model) -> int:
    m = model.size_multiple
    return max(16, model.min_size, m) // m * m if m > 1 else max(16, model.min_size)


def _batch(model, b: int = 2, dtype=torch.float32):
    s = _size(model)
    x = torch.randn(b, model.in_chans, s, s, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = task_of(model).example_targets(b, model.num_classes, (s, s), torch.Generator().manual_seed(1))
    return x, y


# ----------------------------------------------------------------------------- zoo.create_model
CREATE_CASES = [
    ("name-none", None, {}, TypeError, "model name must be a str"),
    ("name-int", 3, {}, TypeError, "model name must be a str"),
    ("unknown-kwarg", "test-wrn10-1", {"colour": "red"}, TypeError, r"takes no argument\(s\) \['colour'\].*depth"),
    ("typo-kwarg-suggests", "test-wrn10-1", {"widht": 2}, TypeError, "Did you mean 'width' for 'widht'"),
    ("num-classes-0", "test-wrn10-1", {"num_classes": 0}, ValueError, "num_classes must be an int >= 2.*got 0"),
    ("num-classes-1-segmenter", "test-unet-w4", {"num_classes": 1}, ValueError, "num_classes must be an int >= 2"),
    ("num-classes-str", "test-wrn10-1", {"num_classes": "10"}, ValueError, "num_classes must be an int"),
    ("num-classes-float", "test-wrn10-1", {"num_classes": 2.5}, ValueError, "num_classes must be an int"),
    ("in-chans-0", "test-wrn10-1", {"in_chans": 0}, ValueError, "in_chans must be an int >= 1"),
    ("bad-depth", "test-wrn10-1", {"depth": 11}, ValueError, "6n\\+4"),
    ("batchnorm", "test-wrn10-1", {"norm": "batchnorm"}, ValueError, "per-sample"),
]


@pytest.mark.parametrize("name,kwargs,exc,pattern", [c[1:] for c in CREATE_CASES], ids=[c[0] for c in CREATE_CASES])
def test_create_model(name, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        zoo.create_model(name, **kwargs)


def test_unknown_name_is_not_mistaken_for_a_bad_kwarg():
    with pytest.raises(UnknownModelError, match="Did you mean 'test-wrn10-1'"):
        zoo.create_model("test-wrn10_1", colour="red")


def test_reset_classifier_refuses_fewer_than_two_classes():
    model = zoo.create_model("test-wrn10-1")
    for bad in (0, 1, 2.0):
        with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
            model.reset_classifier(bad)
    assert model.num_classes == 10


# ----------------------------------------------------------------------------- model forward, every family
def _nan(x):
    x = x.clone()
    x[0, 0, 1, 1] = float("nan")
    return x


def _inf(x):
    x = x.clone()
    x[-1, -1, 0, 0] = -float("inf")
    return x


FORWARD_CASES = [  # (id, make the bad input from a good batch x, exception, message pattern)
    ("3d-single-image", lambda x: x[0], ValueError, r"expects images \[B, C, H, W\].*unsqueeze"),
    ("5d", lambda x: x[None], ValueError, r"expects images \[B, C, H, W\]"),
    ("channels-plus-one", lambda x: torch.cat([x, x[:, :1]], 1), ValueError, "input channels.*in_chans="),
    ("channels-last", lambda x: x.permute(0, 2, 3, 1), ValueError, "input channels"),
    ("uint8", lambda x: x.to(torch.uint8), TypeError, r"floating point.*x.float\(\) / 255"),
    ("int64", lambda x: x.long(), TypeError, "floating point"),
    ("float64-on-float32", lambda x: x.double(), TypeError, r"torch.float32 parameters.*torch.float64.*x.to\("),
    ("float16-on-float32", lambda x: x.half(), TypeError, r"torch.float32 parameters.*torch.float16"),
    ("nan", _nan, ValueError, "1 NaN or Inf values"),
    ("minus-inf", _inf, ValueError, "1 NaN or Inf values"),
    ("numpy", lambda x: x.numpy(), TypeError, "expects a torch.Tensor"),
]


@pytest.mark.parametrize("make,exc,pattern", [c[1:] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_forward_refuses(name, make, exc, pattern):
    model = _model(name)
    x, _ = _batch(model)
    with pytest.raises(exc, match=pattern):
        model(make(x))


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_empty_batch_forward_and_gradients(name):
    """A batch of size 0 (an empty Poisson batch) is valid: empty outputs, and ``[0, *shape]`` per-sample
    gradients for every trainable parameter."""
    model = _model(name)
    x, y = _batch(model, b=0)
    s = x.shape[-1]
    with torch.no_grad():
        assert model(x).shape == task_of(model).output_shape(0, model.num_classes, (s, s))
    grads = zoo.per_sample_gradients(model, x, y)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == params.keys() and all(grads[n].shape == (0, *p.shape) for n, p in params.items())


# ----------------------------------------------------------------------------- zoo.per_sample_gradients
PSG_CASES = [  # (id, task, (x, y) -> bad (x, y), exception, pattern); one model per task (the checks are the task's)
    ("no-batch-dim", "any", lambda x, y: (x[0], y), ValueError, "4-D"),
    ("channels", "any", lambda x, y: (x[:, :0], y), ValueError, "expected .* channels, got 0"),
    ("uint8-images", "any", lambda x, y: (x.to(torch.uint8), y), TypeError, "floating"),
    ("float64-on-float32", "any", lambda x, y: (x.double(), y), TypeError, "float32 parameters.*float64"),
    ("half-on-float32", "any", lambda x, y: (x.half(), y), TypeError, "float32 parameters.*float16"),
    ("nan", "any", lambda x, y: (_nan(x), y), ValueError, "NaN"),
    ("inf", "any", lambda x, y: (_inf(x), y), ValueError, "Inf"),
    ("float-targets", "any", lambda x, y: (x, y.float()), TypeError, r"int64.*y.long\(\)"),
    ("int32-targets", "any", lambda x, y: (x, y.int()), TypeError, "int64"),
    ("bool-targets", "any", lambda x, y: (x, y.bool()), TypeError, "int64"),
    ("target-too-large", "any", lambda x, y: (x, y + 10), ValueError, "out of range"),
    ("negative-target", "any", lambda x, y: (x, y - 10), ValueError, "out of range"),
    ("numpy-images", "any", lambda x, y: (x.numpy(), y), TypeError, "torch.Tensors"),
    ("list-targets", "any", lambda x, y: (x, y.tolist()), TypeError, "torch.Tensors"),
    ("labels-b-by-1", "classification", lambda x, y: (x, y[:, None]), ValueError, "batch size mismatch"),
    ("fewer-labels", "classification", lambda x, y: (x, y[:1]), ValueError, "batch size mismatch"),
    ("masks-missing-row", "segmentation", lambda x, y: (x, y[:, 1:]), ValueError, r"masks must be \[B,H,W\]"),
    ("masks-as-labels", "segmentation", lambda x, y: (x, y[:, 0, 0]), ValueError, r"masks must be \[B,H,W\]"),
    ("masks-with-channel", "segmentation", lambda x, y: (x, y[:, None]), ValueError, r"masks must be \[B,H,W\]"),
]
TASK_MODELS = {"classification": "test-wrn10-1", "segmentation": "test-unet-w4"}


@pytest.mark.parametrize("task,make,exc,pattern", [
    pytest.param(t, m, e, p, id=f"{t}-{i}") for i, task, m, e, p in PSG_CASES
    for t in (TASK_MODELS if task == "any" else [task])])
def test_per_sample_gradients_refuse(task, make, exc, pattern):
    model = _model(TASK_MODELS[task])
    x, y = make(*_batch(model))
    with pytest.raises(exc, match=pattern):
        zoo.per_sample_gradients(model, x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("views", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_views_must_be_a_positive_int(views):
    psg = PerSampleGradients(zoo.create_model("test-wrn10-1"))
    try:
        with pytest.raises(ValueError, match="views must be a positive int"):
            psg(*_batch(psg.model, b=2), views=views)
    finally:
        psg.close()


def test_custom_loss_still_refuses_nan_inputs():
    model = _model("test-wrn10-1")
    x, y = _batch(model)
    with pytest.raises(ValueError, match="NaN"):
        zoo.per_sample_gradients(model, _nan(x), y, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_overflowing_input_gives_a_non_finite_gradient_error(name):
    """A finite input of 1e30 overflows float32 inside the model (a squared activation): the per-sample gradients
    are NaN/Inf; they are refused, naming the samples, instead of being handed to clipping and the optimizer."""
    model = zoo.create_model(name)
    x, y = _batch(model, b=3)
    x[1] = 1e30  # only sample 1 overflows
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteGradientError, match=r"1 of 3 samples, at batch positions 1 .*normalise the data"):
        zoo.per_sample_gradients(model, x, y)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    x[1] = 1e3  # large but harmless: no error
    assert all(torch.isfinite(g).all() for g in zoo.per_sample_gradients(model, x, y).values())


# ----------------------------------------------------------------------------- a DP-SGD run on overflowing data
@zd.register_dataset("test-overflowing-normalisation")
class _OverflowInfo(zd.DatasetInfo):
    """64 random RGB 16x16 images whose normalisation std is 1e-36 (a bogus constant, e.g. a zero std with a tiny
    epsilon): every normalised pixel is finite (up to 5e35) but overflows float32 inside the model."""

    num_classes, in_chans, image_size = 2, 3, (3, 16, 16)
    mean, std = (0.5, 0.5, 0.5), (1e-36, 1e-36, 1e-36)
    classes = ("a", "b")

    def load(self, split="train", data_dir=None, download=False):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=g)
        return zd.ImageDataset(x, torch.arange(64) % 2, self)


def test_dp_step_on_overflowing_data_stops_before_the_update(tmp_path):
    from zoo.dp.step import dp_gradients

    model = zoo.create_model("test-wrn10-1", num_classes=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = zd.get_dataset_info("test-overflowing-normalisation").load()
    psg = PerSampleGradients(model)
    try:
        with pytest.raises(NonFiniteGradientError, match="no update was applied"):
            dp_gradients(psg, [data.batch(slice(0, 8))], clip_norm=1.0, sigma=1.0, expected_batch=8.0, views=1,
                         noise_generator=torch.Generator().manual_seed(0))
    finally:
        psg.close()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # a whole run: a checkpoint already in out_dir stays byte-identical and loadable, and nothing is written (not
    # a run's step or final checkpoint: a fresh run refuses a folder holding those, tests/test_run_folder.py)
    card = get_card("test-wrn10-1")
    saved = save_checkpoint(tmp_path / "earlier-model", model=model, model_name="test-wrn10-1", card=card,
                            model_args={**card["args"], "num_classes": 2, "in_chans": 3}, ledger=None)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(NonFiniteGradientError):
        zoo.train("test-wrn10-1", dataset="test-overflowing-normalisation", out_dir=tmp_path, seed=0, steps=2,
                  checkpoint_every=1, batch_size=16, physical_batch_size=16, augmult=1, train_subset=None,
                  progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert all(torch.isfinite(v).all() for v in load_checkpoint(saved)[0].state_dict().values())


def test_aligned_gradients_on_overflowing_data_are_refused_too():
    """Gradient self-alignment computes its per-sample gradients with torch.func (no input check inside): the
    same non-finite gradient check runs on its result."""
    from zoo.dp.alignment import AlignedPerSampleGradients, AlignSettings

    model = zoo.create_model("test-wrn10-1", num_classes=2)
    psg = AlignedPerSampleGradients(model, AlignSettings(mode="all"))
    psg.set_reference({n: torch.randn_like(p) for n, p in model.named_parameters()})
    x, y = zd.get_dataset_info("test-overflowing-normalisation").load().batch(slice(0, 4))
    with pytest.raises(NonFiniteGradientError, match="no update was applied"):
        psg(x, y)


# ----------------------------------------------------------------------------- zoo.train / zoo.finetune arguments
def test_train_arguments_refused_before_any_data_is_read(tmp_path):
    nowhere = tmp_path / "no-data"  # nothing is read: the errors come first
    with pytest.raises(zd.UnknownDatasetError, match="Did you mean 'cifar10'"):
        zoo.train("test-wrn10-1", dataset="cifar100", data_dir=nowhere, progress=False)
    with pytest.raises(ValueError, match=r"unknown recipe setting\(s\) \['learning_rate'\]"):
        zoo.train("test-wrn10-1", learning_rate=0.1, data_dir=nowhere, progress=False)
    with pytest.raises(TypeError, match="Did you mean 'l0_lambda'"):
        zoo.train("test-wrn10-1-l0", model_args={"l0_lamda": 0.1}, data_dir=nowhere, progress=False)
    with pytest.raises(UnknownModelError, match="Did you mean 'test-wrn10-1'"):
        zoo.train("test-wrn10_1", data_dir=nowhere, progress=False)
    for key, value in (("batch_size", 0), ("epsilon", -1.0), ("momentum", 1.5), ("lr", 0.0), ("delta", 1.0)):
        with pytest.raises(ValueError, match=rf"recipe\.{key}: got {value!r}, expected .*; change that setting"):
            zoo.train("test-wrn10-1", data_dir=nowhere, progress=False, **{key: value})  # the card's ranges


def test_finetune_to_an_unknown_dataset(tmp_path):
    card = get_card("test-wrn10-1")
    path = save_checkpoint(tmp_path / "ck", model=zoo.create_model("test-wrn10-1"), model_name="test-wrn10-1",
                           card=card, model_args={**card["args"], "num_classes": 10, "in_chans": 3}, ledger=None)
    with pytest.raises(zd.UnknownDatasetError, match="unknown dataset 'pneumonia'.*'pneumoniamnist'"):
        zoo.finetune(path, "pneumonia", epsilon=1.0, delta=1e-5, data_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------- data sets
_INFO = zd.get_dataset_info("cifar10")
_IMAGES, _LABELS = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 9])
IMAGE_DATASET_CASES = [
    ("float-images", _IMAGES.float(), _LABELS, r"images must be uint8 \[N,3,H,W\]"),
    ("grayscale-for-rgb", _IMAGES[:, :1], _LABELS, r"images must be uint8 \[N,3,H,W\]"),
    ("channels-last", _IMAGES.permute(0, 2, 3, 1), _LABELS, r"images must be uint8 \[N,3,H,W\]"),
    ("int32-labels", _IMAGES, _LABELS.int(), r"labels must be int64 \[4\]"),
    ("one-label-short", _IMAGES, _LABELS[:3], r"labels must be int64 \[4\]"),
    ("label-10-of-10-classes", _IMAGES, torch.tensor([0, 1, 2, 10]), r"\[0, 10\).*max 10"),
    ("negative-label", _IMAGES, torch.tensor([0, -1, 2, 3]), r"\[0, 10\).*min -1"),
]


@pytest.mark.parametrize("images,labels,pattern", [c[1:] for c in IMAGE_DATASET_CASES],
                         ids=[c[0] for c in IMAGE_DATASET_CASES])
def test_image_dataset_refuses(images, labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        zd.ImageDataset(images, labels, _INFO)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def _save(path, arr):
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=True)


CACHE_CASES = [  # (id, file, damage) on the cached val split of ISBI 2012 (5 slices)
    ("truncated-images", "val_images.npy", _truncate),
    ("truncated-masks", "val_labels.npy", _truncate),
    ("not-an-npy", "val_images.npy", lambda p: p.write_text("hello")),
    ("pickled-object-array", "val_labels.npy", lambda p: _save(p, np.array([{"a": 1}], dtype=object))),
    ("images-missing-channel-axis", "val_images.npy", lambda p: _save(p, np.load(p)[:, 0])),
    ("images-float", "val_images.npy", lambda p: _save(p, np.load(p).astype(np.float32))),
    ("masks-one-short", "val_labels.npy", lambda p: _save(p, np.load(p)[:4])),
    ("masks-int64", "val_labels.npy", lambda p: _save(p, np.load(p).astype(np.int64))),
    ("mask-value-out-of-range", "val_labels.npy", lambda p: _save(p, np.load(p) * 2)),
]


@pytest.fixture(scope="module")
def isbi_val_cache(data_dir, tmp_path_factory):
    """A private cache root holding the decoded ISBI val split, and that split as loaded."""
    cache = tmp_path_factory.mktemp("bad_input_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_CACHE", str(cache))
        ref = zd.get_dataset_info("isbi2012").load("val", data_dir=data_dir)
    (folder,) = (cache / "data" / "isbi2012").iterdir()
    return folder, ref


@pytest.mark.parametrize("file,damage", [c[1:] for c in CACHE_CASES], ids=[c[0] for c in CACHE_CASES])
def test_damaged_cache_is_rebuilt_from_the_verified_source(file, damage, isbi_val_cache, data_dir, monkeypatch):
    folder, ref = isbi_val_cache
    monkeypatch.setenv("ZOO_CACHE", str(folder.parents[2]))
    damage(folder / file)
    with pytest.warns(UserWarning, match=f"cached arrays .* in {re.escape(str(folder))} are unreadable or invalid"):
        again = zd.get_dataset_info("isbi2012").load("val", data_dir=data_dir)
    assert torch.equal(again.images, ref.images) and torch.equal(again.masks, ref.masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt for good: the next load is silent
        zd.get_dataset_info("isbi2012").load("val", data_dir=data_dir)


# ----------------------------------------------------------------------------- model cards
def _set(path: str, value):
    def edit(card):
        *keys, last = path.split(".")
        d = card
        for k in keys:
            d = d[k]
        d[last] = value
    return edit


CARD_CASES = [  # (id, edit of a valid card, message pattern); schema keys and types: test_registry
    ("accountant-moments", _set("recipe.accountant", "moments"), r"recipe.accountant: got 'moments'.*'rdp' or 'prv'"),
    ("epsilon-zero", _set("recipe.epsilon", 0), r"recipe.epsilon: got 0, expected a number > 0"),
    ("epsilon-nan", _set("recipe.epsilon", float("nan")), r"recipe.epsilon: got nan"),
    ("delta-one", _set("recipe.delta", 1), r"recipe.delta: got 1, expected a number in \(0, 1\)"),
    ("delta-zero", _set("recipe.delta", 0.0), r"recipe.delta: got 0.0"),
    ("batch-size-zero", _set("recipe.batch_size", 0), r"recipe.batch_size: got 0, expected an int >= 1"),
    ("steps-bool", _set("recipe.steps", True), r"recipe.steps: expected int, got True"),
    ("augmult-zero", _set("recipe.augmult", 0), r"recipe.augmult: got 0"),
    ("physical-batch-negative", _set("recipe.physical_batch_size", -8), r"recipe.physical_batch_size: got -8"),
    ("clip-norm-inf", _set("recipe.clip_norm", float("inf")), r"recipe.clip_norm: got inf, expected a finite"),
    ("lr-negative", _set("recipe.lr", -1.0), r"recipe.lr: got -1.0"),
    ("momentum-one", _set("recipe.momentum", 1.0), r"recipe.momentum: got 1.0, expected a number in \[0, 1\)"),
    ("ema-decay-above-one", _set("recipe.ema_decay", 1.5), r"recipe.ema_decay: got 1.5"),
    ("lr-schedule-unknown", _set("recipe.lr_schedule", "step"), r"recipe.lr_schedule: got 'step'.*'cosine'"),
    ("align-unknown", _set("recipe.align", "some"), r"recipe.align: got 'some'"),
    ("align-fraction-zero", _set("recipe.align_fraction", 0.0), r"recipe.align_fraction: got 0.0"),
    ("crop-zero", _set("recipe.crop", 0), r"recipe.crop: got 0"),
    ("train-subset-str", _set("recipe.train_subset", "all"), r"recipe.train_subset: expected"),
    ("unknown-dataset", _set("recipe.dataset", "cifar100"), r"recipe.dataset: got 'cifar100'.*'cifar10'"),
    ("input-size-2d", _set("input_size", [3, 32]), r"input_size: got \[3, 32\], expected \[channels, height"),
    ("input-size-zero", _set("input_size", [3, 32, 0]), r"input_size: got \[3, 32, 0\]"),
    ("input-size-float", _set("input_size", [3, 32.0, 32]), r"input_size: got \[3, 32.0, 32\]"),
    ("one-class", _set("num_classes", 1), r"num_classes: got 1, expected an int >= 2"),
    ("sha256-short", _set("checkpoints", [{"tag": "x", "file": "weights/x.safetensors", "sha256": "abc"}]),
     r"sha256: got 'abc'"),
    ("tag-duplicate", _set("checkpoints", [{"tag": "dp", "file": "a", "sha256": "a" * 64},
                                           {"tag": "dp", "file": "b", "sha256": "b" * 64}]),
     r"checkpoints\[1\]\.tag: got 'dp', expected a unique tag"),
    ("tag-with-dot", _set("checkpoints", [{"tag": "dp.8", "file": "a", "sha256": "a" * 64}]), r"tag: got 'dp.8'"),
    ("name-with-dot", _set("name", "test.wrn"), r"name: got 'test.wrn', expected a name without '.'"),
    ("result-of-no-checkpoint", _set("results", [{"dataset": "cifar10", "split": "test", "metric": "accuracy",
                                                  "value": 0.5, "epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
                                                  "command": "zoo train x", "hardware": "CPU", "date": "2026-12-01",
                                                  "checkpoint": "dp_eps8"}]),
     r"results\[0\]\.checkpoint: got 'dp_eps8', expected one of the card's tags \[\]"),
]


@pytest.mark.parametrize("edit,pattern", [c[1:] for c in CARD_CASES], ids=[c[0] for c in CARD_CASES])
def test_card_with_a_bad_value_is_refused(edit, pattern):
    card = copy.deepcopy(get_card("test-wrn10-1"))
    edit(card)
    with pytest.raises(CardError, match=pattern) as e:
        validate_card(card, "card 'test-wrn10-1'", datasets=zd.list_datasets())  # the registered ones, as the registry
    assert str(e.value).startswith("card 'test-wrn10-1'.")


@pytest.mark.parametrize("args,pattern", [({"widht": 1}, "Did you mean 'width'"), ({"depth": 10, "colour": 1},
                                          r"takes no argument\(s\) \['colour'\]")], ids=["typo", "unknown"])
def test_card_with_arguments_its_family_does_not_take_is_refused(args, pattern):
    card = copy.deepcopy(get_card("test-wrn10-1"))
    card["name"], card["args"] = "test-bad-args", args
    with pytest.raises(CardError, match=f"card 'test-bad-args': args: .*{pattern}"):
        register_model(card)
    assert "test-bad-args" not in zoo.list_models()


def test_card_file_not_json_or_misnamed(tmp_path):
    bad = tmp_path / "test-wrn10-1.json"
    bad.write_text('{"name": "test-wrn10-1",')
    with pytest.raises(CardError, match="not valid JSON"):
        load_card(bad)
    misnamed = tmp_path / "other.json"
    misnamed.write_text(json.dumps(get_card("test-wrn10-1")))
    with pytest.raises(CardError, match=r"file name must be the model name \(test-wrn10-1.json\)"):
        load_card(misnamed)
