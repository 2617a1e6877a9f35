"""The `zoo` command line, run as a user would."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import zoo


def zoo_cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_list_and_info():
    out = zoo_cli("list").stdout.split()
    assert "wrn16-4" in out and "resnet9-scalenorm" in out
    assert zoo_cli("list", "test-*").stdout.split() == zoo.list_models("test-*")
    info = json.loads(zoo_cli("info", "wrn16-4").stdout)
    assert info["num_params"] == 2748890 and info["recipe"]["clip_norm"] == 1.0


HEAVY = ("torch", "opacus", "escnn", "matplotlib", "numpy", "kymatio")


@pytest.mark.parametrize("argv", [["list"], ["list", "--pretrained"], ["list", "eq-*"], ["--help"],
                                  ["train", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_and_list_import_no_heavy_module(argv):
    """`zoo --help` and `zoo list` read the cards alone: none of torch, opacus, escnn, matplotlib, numpy is
    imported (each costs seconds), and they print what they should."""
    probe = ("import sys\nfrom zoo.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint('HEAVY', sorted(m for m in %r if m in sys.modules))\nsys.exit(code)" % (HEAVY,))
    p = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "HEAVY []", p.stdout
    out = p.stdout.splitlines()[:-1]
    if argv[0] == "list":
        pattern = next((a for a in argv[1:] if not a.startswith("--")), "*")
        assert out and out == zoo.list_models(pattern, pretrained="--pretrained" in argv)
    else:
        assert "usage: zoo" in p.stdout


def test_import_zoo_reads_cards_only_and_loads_the_rest_on_use():
    probe = ("import sys, zoo\nassert zoo.list_models() and zoo.list_models(pretrained=True)\n"
             "print(sorted(m for m in %r if m in sys.modules))\nzoo.create_model('wrn16-1')\n"
             "print('torch' in sys.modules, 'escnn' in sys.modules)\nzoo.per_sample_gradients\n"
             "print('opacus' in sys.modules)" % (HEAVY,))
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:3] == ["[]", "True False", "True"], p.stdout


def test_python_dash_m_zoo():
    assert zoo_cli("list", "wrn16-1").stdout.split() == ["wrn16-1"]


def test_unknown_model_is_a_clear_error():
    p = zoo_cli("info", "wrn16_4", check=False)
    assert p.returncode == 2 and "Did you mean 'wrn16-4'" in p.stderr


def test_card_is_up_to_date():
    assert "up to date" in zoo_cli("card", "--check").stdout


def test_train_then_eval(data_dir, tmp_path):
    p = zoo_cli("train", "test-wrn10-1", "--data-dir", str(data_dir), "--out", str(tmp_path), "--seed", "0",
                "--steps", "2", "--test-subset", "100", "--no-progress")
    assert "test accuracy" in p.stdout and "epsilon=" in p.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ledger"]["steps"] == 2
    ev = json.loads(zoo_cli("eval", str(tmp_path / "final.safetensors"), "--data-dir", str(data_dir),
                            "--test-subset", "100", "--out", str(tmp_path / "eval.json")).stdout)
    assert ev["test"]["accuracy"] == result["test"]["accuracy"]
    assert json.loads((tmp_path / "eval.json").read_text()) == ev


def test_missing_data_is_a_clear_error(tmp_path):
    p = zoo_cli("train", "test-wrn10-1", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                "--no-progress", check=False)
    assert p.returncode == 2 and "cifar-10-python.tar.gz" in p.stderr


def test_tampered_checkpoint_is_refused(data_dir, tmp_path):
    zoo_cli("train", "test-wrn10-1", "--data-dir", str(data_dir), "--out", str(tmp_path), "--seed", "0",
            "--steps", "1", "--test-subset", "50", "--no-progress")
    f = tmp_path / "final.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    p = zoo_cli("eval", str(f), "--data-dir", str(data_dir), check=False)
    assert p.returncode == 2 and "sha256" in p.stderr


def test_train_on_another_dataset_with_model_args(data_dir, tmp_path):
    from zoo.catalog.registry import load_checkpoint

    zoo_cli("train", "test-wrn10-1-l0", "--dataset", "pneumoniamnist", "--model-arg", "l0_lambda=0.2",
            "--steps", "2", "--batch-size", "64", "--physical-batch-size", "64", "--augmult", "1",
            "--test-subset", "100", "--seed", "0", "--no-progress", "--out", str(tmp_path),
            "--data-dir", str(data_dir))
    model, _ = load_checkpoint(tmp_path / "final.safetensors")
    assert (model.in_chans, model.num_classes, model.l0_lambda) == (1, 2, 0.2)
    bad = zoo_cli("train", "test-wrn10-1-l0", "--model-arg", "l0_lambda", check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_segmentation_train_then_eval_at_the_trained_resolution(data_dir, tmp_path):
    """The card's recipe resizes ISBI to 64x64; `zoo eval` evaluates the checkpoint at that resolution."""
    p = zoo_cli("train", "test-unet-w4", "--data-dir", str(data_dir), "--out", str(tmp_path), "--seed", "0",
                "--steps", "2", "--crop", "32", "--no-progress")
    assert "test Dice" in p.stdout and "IoU" in p.stdout and "epsilon=" in p.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["recipe"]["crop"] == 32 and result["recipe"]["resize"] == 64
    ev = json.loads(zoo_cli("eval", str(tmp_path / "final.safetensors"), "--data-dir", str(data_dir),
                            "--out", str(tmp_path / "eval.json")).stdout)
    assert ev["test"]["dice_membrane"] == result["test"]["dice_membrane"]
    assert ev["test"]["iou_cell"] == result["test"]["iou_cell"]

    # `zoo segment`: masks of the images' own sizes, as zoo.segment gives them in-process
    import numpy as np
    from PIL import Image

    from zoo.catalog.registry import load_checkpoint

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 70), dtype=np.uint8)).save(tmp_path / "slice.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")  # luma'd
    p = zoo_cli("segment", str(tmp_path / "final.safetensors"), str(tmp_path / "slice.png"), str(tmp_path / "rgb.png"),
                "--out", str(tmp_path / "masks"))
    assert "slice-mask.png (70x45; cell " in p.stdout and "rgb-mask.png (20x30" in p.stdout
    model, sidecar = load_checkpoint(tmp_path / "final.safetensors")
    mask = np.asarray(Image.open(tmp_path / "masks" / "slice-mask.png"))
    expected = zoo.segment(model, np.asarray(Image.open(tmp_path / "slice.png")), cfg=sidecar["preparation"])
    assert mask.shape == (45, 70) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask, expected.numpy().astype(np.uint8) * 255)
    bad = zoo_cli("segment", str(tmp_path / "final.safetensors"), str(tmp_path / "missing.png"), check=False)
    assert bad.returncode == 2 and "no such image file" in bad.stderr


def test_finetune_a_cifar10_checkpoint_on_pneumonia_with_alignment_then_eval(data_dir, tmp_path):
    """`zoo finetune` of an RGB CIFAR-10 checkpoint on grayscale PneumoniaMNIST: the head is reset to 2 classes, the
    X-rays are repeated to the 3 input channels (in training and in `zoo eval`), a fresh ledger starts with the
    CIFAR-10 one as its parent, and `--align subset` is taken from the command line."""
    from zoo.catalog.registry import load_checkpoint

    zoo_cli("train", "test-wrn10-1", "--data-dir", str(data_dir), "--out", str(tmp_path / "cifar"), "--seed", "0",
            "--steps", "1", "--test-subset", "50", "--no-progress")
    p = zoo_cli("finetune", str(tmp_path / "cifar" / "final.safetensors"), "--dataset", "pneumoniamnist",
                "--epsilon", "3", "--delta", "1e-4", "--steps", "2", "--batch-size", "32", "--physical-batch-size",
                "16", "--augmult", "1", "--align", "subset", "--align-fraction", "0.2", "--test-subset", "100",
                "--seed", "0", "--no-progress", "--data-dir", str(data_dir), "--out", str(tmp_path / "pn"))
    assert "repeating them to the model's 3 input channels" in p.stdout and "balanced" in p.stdout
    model, sidecar = load_checkpoint(tmp_path / "pn" / "final.safetensors")
    assert (model.in_chans, model.num_classes) == (3, 2)
    led = sidecar["ledger"]
    assert led["dataset"] == "pneumoniamnist" and led["parent"]["dataset"] == "cifar10" and led["epsilon"] <= 3
    recipe = sidecar["train_state"]["recipe"]
    assert (recipe["align"], recipe["align_fraction"]) == ("subset", 0.2)
    ev = json.loads(zoo_cli("eval", str(tmp_path / "pn" / "final.safetensors"), "--data-dir", str(data_dir),
                            "--test-subset", "100", "--out", str(tmp_path / "eval.json")).stdout)
    assert ev["test"]["roc_auc"] == sidecar["metrics"]["roc_auc"]


def test_finetune_with_resize_0_and_crop_0_unsets_the_source_cards_preparation(data_dir, tmp_path):
    """A checkpoint whose card resizes (and crops) fine-tuned at the data's own size: ``--resize 0 --crop 0`` unset
    the card's settings (as ``--train-subset 0`` does), in the run's recipe and in its input preparation."""
    from zoo.catalog.registry import load_checkpoint

    zoo_cli("train", "test-unet-w4", "--data-dir", str(data_dir), "--out", str(tmp_path / "src"), "--seed", "0",
            "--steps", "1", "--test-subset", "1", "--no-progress")
    _, src = load_checkpoint(tmp_path / "src" / "final.safetensors")
    assert (src["train_state"]["recipe"]["resize"], src["preparation"]["input_size"]) == (64, [1, 64, 64])
    zoo_cli("finetune", str(tmp_path / "src" / "final.safetensors"), "--dataset", "isbi2012", "--epsilon", "8",
            "--delta", "1e-4", "--resize", "0", "--crop", "0", "--steps", "1", "--batch-size", "2",
            "--physical-batch-size", "2", "--augmult", "1", "--test-subset", "1", "--seed", "0", "--no-progress",
            "--data-dir", str(data_dir), "--out", str(tmp_path / "ft"))
    _, side = load_checkpoint(tmp_path / "ft" / "final.safetensors")
    recipe = side["train_state"]["recipe"]
    assert (recipe["resize"], recipe["crop"]) == (None, None) and side["preparation"]["input_size"] == [1, 512, 512]
    assert "--resize 0" in side["command"]

def test_card_plots_are_deterministic_and_the_card_links_them():
    from zoo.render import render_model_card, render_plots

    infos = [zoo.model_info(n) for n in zoo.list_models("*pneumonia")]
    a, b = render_plots(infos), render_plots(infos)
    assert a == b and list(a) == ["pneumoniamnist.png"] and a["pneumoniamnist.png"].startswith(b"\x89PNG\r\n\x1a\n")
    text = render_model_card(infos)
    assert "![pneumoniamnist: metrics vs ε](models/plots/pneumoniamnist.png)" in text
    assert "| `eq-resnet9-c4-pneumonia` | classification | eq-resnet9 | C4 (last stage C2) | dense | 163,462 |" in text
    assert "| `wrn16-1-pneumonia` | classification | wideresnet | - | dense |" in text
    assert "training time and hardware: CPU x86_64, 2 cores (card results)" in text


def test_card_sparsity_counts_the_open_gates_of_an_l0_checkpoint():
    from zoo.render import _sparsity
    from zoo.nn.sparse import expected_l0, gate_modules

    info = zoo.model_info("test-wrn10-1-l0")
    model = zoo.create_model("test-wrn10-1-l0")
    gates = gate_modules(model)
    n = sum(g.log_alpha.numel() for g in gates)
    assert _sparsity(info, None) == f"L0, {n} gates (untrained)"
    gates[0].log_alpha.data[:3] = -10.0  # test-time gate sigmoid(-10) * 1.2 - 0.1 < 0: closed
    assert _sparsity(info, model) == (f"L0, {n - 3}/{n} gates open ({(n - 3) / n:.0%}), "
                                      f"expected L0 {expected_l0(model).item():.1f}")
    assert _sparsity(zoo.model_info("test-wrn10-1"), None) == "dense"
