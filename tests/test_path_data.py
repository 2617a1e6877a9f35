"""Your own data by path (zoo.data.folder): the two forms, what a run records, and every refusal of bad input.

The data are small synthetic images written to tmp_path (no data root needed): learnable (the class sets the
brightness), so a short private run beats chance and the checks of a fresh process compare real metrics.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

import zoo
from zoo.data import DataIntegrityError, DataNotFoundError, UnknownDatasetError, get_dataset_info
from zoo.data.folder import BadDataError, from_arrays, from_path

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _images(n: int, seed: int, size=(16, 16), channels: int | None = None):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 120, (n, *size, *((channels,) if channels else ())), dtype=np.uint8)
    x[y == 1] += 100  # class 1 is brighter: learnable
    return x, y


def _npz(path: Path, n_train=64, n_test=32, **extra) -> Path:
    xtr, ytr = _images(n_train, 0)
    xte, yte = _images(n_test, 1)
    np.savez(path, **{"train_images": xtr, "train_labels": ytr[:, None], "test_images": xte, "test_labels": yte,
                      **extra})
    return path


def _tree(root: Path, splits=("train", "test"), n=24, size=(16, 16), mode="L") -> Path:
    for split, seed in zip(splits, (0, 1, 2)):
        x, y = _images(n, seed, size, 3 if mode == "RGB" else None)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / ("cat", "dog")[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{split}{i}.png")
    return root


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, cwd=cwd)


RUN = dict(epsilon=8.0, delta=1e-3, steps=4, batch_size=32, physical_batch_size=32, augmult=1, seed=0,
           progress=False, train_subset=None)  # the test card's own subset is of CIFAR-10


def test_npz_by_path_trains_records_its_manifest_and_evaluates_in_a_fresh_process(tmp_path):
    data = _npz(tmp_path / "mine.npz")
    result = zoo.train("test-wrn10-1", dataset=str(data), out_dir=tmp_path / "run", **RUN)
    ledger = result["ledger"]
    assert ledger["dataset"] == str(data.resolve()) == result["dataset"]
    m = ledger["manifest"]
    assert m["form"] == "npz" and m["images"] == {"train": 64, "test": 32} and m["classes"] == ["0", "1"]
    assert m["channels"] == 1 and m["size"] == [16, 16] and len(m["sha256"]) == 64 and m["split"] is None
    prep = result["preparation"]
    assert prep["mean"] == [0.5] and prep["std"] == [0.5] and "never statistics" in prep["normalisation_source"]
    assert prep["resize"]["size"] == [32, 32]  # to the card's input size, with a notice
    p = _cli("eval", str(tmp_path / "run" / "final.safetensors"), "--out", str(tmp_path / "eval.json"))
    assert p.returncode == 0, p.stderr
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["dataset"] == str(data.resolve())
    assert again["test"]["accuracy"] == pytest.approx(result["test"]["accuracy"], abs=1e-6)


def test_changed_data_is_refused_where_it_claims_to_be_the_same(tmp_path):
    data = _npz(tmp_path / "mine.npz")
    zoo.train("test-wrn10-1", dataset=str(data), out_dir=tmp_path / "run", **RUN)
    with np.load(data) as z:
        arrays = dict(z)
    arrays["test_labels"] = 1 - arrays["test_labels"]
    np.savez(data, **arrays)
    p = _cli("eval", str(tmp_path / "run" / "final.safetensors"))
    assert p.returncode == 2 and "is not the data" in p.stderr and "content sha256" in p.stderr, p.stderr
    with pytest.raises(DataIntegrityError, match="is not the data .* trained on"):  # composing a budget on it
        zoo.finetune(tmp_path / "run" / "final.safetensors", str(data), 8.0, 1e-3, out_dir=tmp_path / "ft",
                     **{k: v for k, v in RUN.items() if k not in ("epsilon", "delta")})


def test_same_content_at_another_path_composes_the_budget(tmp_path):
    data = _npz(tmp_path / "mine.npz")
    first = zoo.train("test-wrn10-1", dataset=str(data), out_dir=tmp_path / "run", **RUN)
    moved = tmp_path / "elsewhere" / "renamed.npz"
    moved.parent.mkdir()
    moved.write_bytes(data.read_bytes())
    ft = zoo.finetune(tmp_path / "run" / "final.safetensors", str(moved), 8.0, 1e-3, out_dir=tmp_path / "ft",
                      **{k: v for k, v in RUN.items() if k not in ("epsilon", "delta")})
    assert ft["ledger"]["steps"] == first["ledger"]["steps"] + RUN["steps"]  # one ledger: the same people
    assert ft["ledger"]["epsilon"] > first["ledger"]["epsilon"]


def test_image_folder_without_test_split_holds_out_a_recorded_seeded_split(tmp_path, capsys):
    root = _tree(tmp_path / "tree", splits=("train",), n=40, mode="RGB")
    ds = from_path(root)
    assert ds.classes == ("cat", "dog") and ds.in_chans == 3 and ds.image_size == (3, 16, 16)
    assert ds.manifest["images"] == {"train": 32, "test": 8} and "seed 0" in ds.manifest["split"]["test"]
    assert "holding out 8" in capsys.readouterr().out
    again = from_path(root)
    assert again is ds  # read once per process while the files are unchanged
    test = ds.load("test")
    assert test.labels.tolist().count(0) == test.labels.tolist().count(1) == 4  # stratified


def test_image_folder_trains_from_the_cli(tmp_path):
    root = _tree(tmp_path / "tree", n=24)
    p = _cli("train", "test-wrn10-1", "--dataset", "tree", "--epsilon", "8", "--delta", "1e-3", "--steps", "2",
             "--batch-size", "16", "--physical-batch-size", "16", "--seed", "0", "--out", "run", "--no-progress",
             "--train-subset", "0",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"on {root.resolve()}: test accuracy" in p.stdout and "imagefolder" in p.stdout


def test_from_arrays_registers_in_process(tmp_path, request):
    from zoo.data.base import _REGISTRY
    saved = dict(_REGISTRY)
    request.addfinalizer(lambda: (_REGISTRY.clear(), _REGISTRY.update(saved)))  # registered for this test only
    x, y = _images(40, 0)
    ds = from_arrays("my-arrays", x, y, *_images(20, 1), classes=("dark", "bright"))
    assert get_dataset_info("my-arrays") is ds and ds.manifest["form"] == "arrays"
    r = zoo.train("test-wrn10-1", dataset="my-arrays", out_dir=tmp_path / "run", **RUN)
    assert r["ledger"]["manifest"]["sha256"] == ds.manifest["sha256"]
    with pytest.raises(ValueError, match="already registered with other content"):
        from_arrays("my-arrays", x[::-1], y[::-1])


def _write(tmp_path: Path, case: str) -> Path:
    """The bad data of ``case``; returns the path to read."""
    if case == "mixed-sizes":
        root = _tree(tmp_path / "t")
        Image.fromarray(np.zeros((20, 18), np.uint8)).save(root / "train" / "cat" / "odd.png")
        return root
    if case == "unreadable":
        root = _tree(tmp_path / "t")
        (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
        return root
    if case == "class-not-in-train":
        root = _tree(tmp_path / "t")
        (root / "test" / "bird").mkdir()
        return root
    if case == "empty-class":
        root = _tree(tmp_path / "t")
        (root / "train" / "emu").mkdir()
        return root
    if case == "16-bit":
        root = _tree(tmp_path / "t")
        Image.fromarray(np.zeros((16, 16), np.uint16)).save(root / "train" / "cat" / "deep.png")
        return root
    if case == "leak":
        root = _tree(tmp_path / "t")
        src = next((root / "train" / "cat").glob("*.png"))
        (root / "test" / "cat" / "copy.png").write_bytes(src.read_bytes())
        return root
    x, y = _images(64, 0)
    arrays = {"train_images": x, "train_labels": y}
    if case == "float":
        arrays["train_images"] = x / 255.0
    elif case == "nan":
        f = x.astype(np.float32)
        f[5, 0, 0] = np.nan
        arrays["train_images"] = f
    elif case == "label-outside":
        arrays.update(test_images=x[:8], test_labels=np.full(8, 2))
    elif case == "class-without-images":
        arrays["train_labels"] = np.where(y == 1, 2, 0)
    elif case == "too-few":
        arrays = {"train_images": x[:6], "train_labels": y[:6]}
    elif case == "multi-label":
        arrays["train_labels"] = np.stack([y, y], 1)
    elif case == "no-train":
        arrays = {"images": x, "labels": y}
    elif case == "npz-leak":
        arrays.update(test_images=x[:4], test_labels=y[:4])
    path = tmp_path / f"{case}.npz"
    np.savez(path, **arrays)
    return path


BAD = [
    ("mixed-sizes", r"images of different sizes: .*odd\.png is 18x20 .*resize them all to one size"),
    ("unreadable", r"broken\.png cannot be read as an image.*replace or remove it"),
    ("class-not-in-train", r"test/bird is a class that train/ does not have"),
    ("empty-class", r"class 'emu' has no training images"),
    ("16-bit", r"deep\.png is a I;16 image .*convert it to 8-bit"),
    ("leak", r"test image \d+ is identical to train image \d+ \(a leak"),
    ("float", r"train_images are float64; zoo takes 8-bit images .*\(x \* 255\)\.round\(\)"),
    ("nan", r"train_images: image 5 holds NaN"),
    ("label-outside", r"test label 0 holds 2, outside the 2 classes"),
    ("class-without-images", r"class 1 \('1'\) has no training images"),
    ("too-few", r"6 training images; private training needs at least 10"),
    ("multi-label", r"multi-label data is not supported"),
    ("no-train", r"it needs train_images and train_labels"),
    ("npz-leak", r"test image 0 is identical to train image 0"),
]


@pytest.mark.parametrize("case,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_data_gets_an_error_that_names_the_file_and_the_fix(tmp_path, case, pattern):
    with pytest.raises(BadDataError, match=pattern):
        from_path(_write(tmp_path, case))


def test_a_path_that_is_not_there_and_an_unknown_name(tmp_path):
    with pytest.raises(DataNotFoundError, match="no data at .*nowhere.npz.*registered data set name"):
        get_dataset_info(str(tmp_path / "nowhere.npz"))
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'cifar11'.*or a path: a MedMNIST-style .npz"):
        get_dataset_info("cifar11")


def test_dataset_help_names_the_registered_sets_and_the_path_forms():
    from zoo.runspec import REGISTERED_HELP
    from zoo.data import list_datasets

    from zoo.data.folder import PathDataset

    shipped = [n for n in list_datasets() if type(get_dataset_info(n)).__module__.startswith("zoo.")
               and not isinstance(get_dataset_info(n), PathDataset)]  # not those that tests register
    assert REGISTERED_HELP.split(", ") == shipped
    help_text = _cli("train", "--help").stdout
    assert "pneumoniamnist" in help_text and ".npz" in help_text and "train/<class>" in help_text


@pytest.mark.parametrize("n,delta", [(50_000, 1e-5), (4_708, 1e-4), (1_000, 1e-4), (546, 1e-3), (300, 1e-3)])
def test_auto_recipe_delta_is_the_power_of_ten_below_one_over_n(n, delta):
    from zoo.training.auto_recipe import delta_for

    assert delta_for(n) == pytest.approx(delta) and delta_for(n) < 1 / n


def test_auto_recipe_splits_the_budget_by_tan_and_keeps_what_is_given():
    from zoo.training.auto_recipe import MIN_STEPS, SAMPLE_RATE, choose

    values, record = choose(4_708, 3.0, {})
    assert values["delta"] == 1e-4 and values["augmult"] == 1 and values["steps"] >= MIN_STEPS
    assert values["batch_size"] / 4_708 == pytest.approx(SAMPLE_RATE, rel=0.05)
    assert record["budget_samples"] == pytest.approx(40 * 4_708, rel=0.01) and record["sigma"] > 1
    assert record["given"] == [] and set(record["reasons"]) >= {"delta", "budget", "batch_size_and_steps"}
    values, record = choose(50_000, 8.0, {"batch_size": 4096, "delta": 1e-6})
    assert "batch_size" not in values and "delta" not in values  # explicit settings win
    assert values["steps"] == round(500_000 / 4096) and record["given"] == ["batch_size", "delta"]


def test_run_on_data_by_path_records_the_recipe_choice_in_the_ledger(tmp_path, capsys):
    data = _npz(tmp_path / "mine.npz")
    r = zoo.train("test-wrn10-1", dataset=str(data), out_dir=tmp_path / "run",
                  **{k: v for k, v in RUN.items() if k != "delta"})  # delta left to zoo
    choice = r["ledger"]["recipe_choice"]
    assert choice["chosen"] == {"delta": 1e-2} and r["ledger"]["delta"] == 1e-2  # N = 64
    assert "batch_size" in choice["given"] and "recipe chosen for N=64" in capsys.readouterr().out
    card = zoo.train("test-wrn10-1", dataset=str(data), out_dir=tmp_path / "card", auto_recipe=False,
                     **{k: v for k, v in RUN.items() if k != "delta"})
    assert card["ledger"]["recipe_choice"] is None and card["ledger"]["delta"] == 1e-5  # the card's own


def test_rgb_data_on_a_one_channel_checkpoint_is_converted_to_gray_as_its_preparation_says(tmp_path):
    from zoo.data import LUMA, prepare_input

    gray = zoo.train("test-wrn10-1", dataset=str(_npz(tmp_path / "gray.npz")), out_dir=tmp_path / "gray", **RUN)
    root = _tree(tmp_path / "rgb", mode="RGB", size=(32, 32), n=40)
    ft = zoo.finetune(tmp_path / "gray" / "final.safetensors", str(root), 8.0, 1e-3, out_dir=tmp_path / "ft",
                      **{k: v for k, v in RUN.items() if k not in ("epsilon", "delta")})
    prep = ft["preparation"]
    assert gray["preparation"]["data_channels"] == 1
    assert prep["data_channels"] == 3 and prep["input_size"][0] == 1 and prep["channel_conversion"] == "luma"
    ds = from_path(root).load("test").with_channels(1)
    x, _ = ds.batch(slice(0, 4))
    assert x.shape == (4, 1, 32, 32)
    raw = from_path(root).load("test").images[:4]
    assert torch.allclose(prepare_input(raw, prep), x, atol=1e-5)
    expected = ((raw.float() / 255 - 0.5) / 0.5 * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(x, expected, atol=1e-5)


def _seg_tree(root: Path, n=12, size=32, splits=False) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        r, c = rng.integers(4, size - 12, 2)
        m[r:r + 8, c:c + 8] = 255  # a bright square is the foreground
        x = (rng.integers(0, 80, (size, size)) + (m > 0) * 150).astype(np.uint8)
        split = ("train" if i < n * 3 // 4 else "test") if splits else ""
        for kind, arr in (("images", x), ("masks", m)):
            d = root / split / kind
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"s{i}.png")
    return root


def test_segmentation_images_and_masks_by_path(tmp_path):
    root = _seg_tree(tmp_path / "seg", n=12)
    ds = from_path(root)
    assert ds.task == "segmentation" and ds.classes == ("background", "foreground")
    assert ds.manifest["form"] == "segfolder" and ds.manifest["images"] == {"train": 10, "test": 2}
    test = ds.load("test")
    assert test.masks.shape == (2, 32, 32) and set(test.masks.unique().tolist()) == {0, 1}
    r = zoo.train("test-unet-w4", dataset=str(root), out_dir=tmp_path / "run", epsilon=8.0, delta=1e-2, steps=2,
                  batch_size=4, physical_batch_size=4, augmult=1, seed=0, progress=False, crop=None,
                  train_subset=None)
    assert r["ledger"]["manifest"]["sha256"] == ds.manifest["sha256"] and "dice" in r["test"]
    split = from_path(_seg_tree(tmp_path / "split", n=8, splits=True))
    assert split.manifest["images"] == {"train": 6, "test": 2} and split.manifest["split"] is None


@pytest.mark.parametrize("case,pattern", [("unmatched", r"s3\.\* has no mask of the same name"),
                                          ("mask-size", r"masks/s0\.png is 16x16 but its image .* is 32x32")])
def test_segmentation_bad_data(tmp_path, case, pattern):
    root = _seg_tree(tmp_path / "seg", n=8)
    if case == "unmatched":
        (root / "masks" / "s3.png").unlink()
    else:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(BadDataError, match=pattern):
        from_path(root)


@pytest.mark.parametrize("attrs,error,pattern", [
    ({"mean": (np.float32(0.5),), "std": (np.float64(0.2),)}, None, ""),
    ({"mean": (0.5, 0.5)}, ValueError, r"mean must hold 1 finite number\(s\), one per channel"),
    ({"std": (0.0,)}, ValueError, r"std must hold 1 finite number\(s\) > 0"),
    ({"num_classes": 1}, TypeError, r"num_classes must be an int >= 2"),
    ({"image_size": (3, 28, 28)}, ValueError, r"image_size must be \(in_chans=1, H, W\)"),
], ids=["numpy-floats-accepted", "mean-per-channel", "zero-std", "one-class", "size-channels"])
def test_registering_a_dataset_class_checks_its_attributes(attrs, error, pattern):
    from zoo import data
    base = {"num_classes": 2, "in_chans": 1, "image_size": (1, 28, 28), "mean": (0.5,), "std": (0.25,)}
    cls = type("Mine", (data.DatasetInfo,), {**base, **attrs})
    if error is None:
        try:
            data.register_dataset("mine")(cls)
            info = data.get_dataset_info("mine")
            assert info.mean == (0.5,) and type(info.std[0]) is float
        finally:
            data.base._REGISTRY.pop("mine", None)
    else:
        with pytest.raises(error, match=f"data set 'mine' \\(Mine\\): {pattern}"):
            data.register_dataset("mine")(cls)
