"""Real DP-SGD runs on CIFAR-10 (the data root from $ZOO_DATA): learning, resuming, budget, fine-tuning."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.catalog.registry import load_checkpoint
from zoo.data import get_dataset_info
from zoo.training.engine import evaluate
from zoo.privacy import BudgetExhaustedError

QUIET = dict(progress=False)


@pytest.mark.slow
def test_dp_training_on_a_cifar10_subset_learns(data_dir, tmp_path):
    r = zoo.train("wrn16-1", out_dir=tmp_path, data_dir=data_dir, seed=0, train_subset=5000, batch_size=250,
                  physical_batch_size=250, steps=40, epsilon=8.0, test_subset=2000, **QUIET)
    led = r["ledger"]
    print(f"\nwrn16-1, 5000 CIFAR-10 images, 40 steps: test accuracy {r['test']['accuracy']:.3f} "
          f"at epsilon {led['epsilon']:.2f} (delta {led['delta']}, sigma {r['noise_multiplier']:.3f})")
    assert 7.9 <= led["epsilon"] <= 8.0 and led["steps"] == 40
    assert r["test"]["accuracy"] >= 0.20  # chance is 0.10; measured 0.268 on the dev machine
    model, sidecar = load_checkpoint(tmp_path / "final.safetensors")  # EMA weights, verified
    test = get_dataset_info("cifar10").load("test", data_dir=data_dir).subset(2000, seed=0)
    assert evaluate(model, test)["accuracy"] == pytest.approx(r["test"]["accuracy"])
    assert "seed" not in sidecar["train_state"]  # the released checkpoint does not publish the secret seed
    assert json.loads((tmp_path / "result.json").read_text())["ledger"] == sidecar["ledger"]


def _final_tensors(path):
    return load_file(path / "final.safetensors")


def _interrupted_run_resumes_exactly(name, tmp_path, **kw):
    """Train ``name`` twice (``kw``: 4 steps, a checkpoint every 2); kill the second as if after its step-2
    checkpoint (delete step 4 and final), resume it without a seed (the checkpoint holds it) and assert that its
    final weights equal the uninterrupted run's. Returns ``(uninterrupted result, resumed result, final tensors)``."""
    a = zoo.train(name, out_dir=tmp_path / "a", **kw)
    zoo.train(name, out_dir=tmp_path / "b", **kw)
    for step in ("step-000004", "final"):
        for suffix in (".safetensors", ".json"):
            (tmp_path / "b" / f"{step}{suffix}").unlink()
    b = zoo.train(name, out_dir=tmp_path / "b", resume=True, **{**kw, "seed": None})
    ta, tb = _final_tensors(tmp_path / "a"), _final_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6), k
    return a, b, ta


def test_resume_after_interruption_equals_an_uninterrupted_run(data_dir, tmp_path):
    kw = dict(data_dir=data_dir, seed=3, steps=4, checkpoint_every=2, test_subset=200, **QUIET)
    a, b, _ = _interrupted_run_resumes_exactly("test-wrn10-1", tmp_path, **kw)
    assert b["ledger"]["steps"] == a["ledger"]["steps"] == 4
    assert b["ledger"]["epsilon"] == a["ledger"]["epsilon"]


def test_budget_is_enforced_and_finetuning_composes(data_dir, tmp_path):
    kw = dict(data_dir=data_dir, test_subset=200, **QUIET)
    first = zoo.train("test-wrn10-1", out_dir=tmp_path / "a", seed=1, steps=4, epsilon=2.0, **kw)
    ckpt = tmp_path / "a" / "final.safetensors"
    with pytest.raises(BudgetExhaustedError, match="already spent"):
        zoo.finetune(ckpt, "cifar10", epsilon=first["ledger"]["epsilon"], delta=1e-5, seed=1, **kw)
    second = zoo.finetune(ckpt, "cifar10", epsilon=4.0, delta=1e-5, seed=1, steps=3, out_dir=tmp_path / "b", **kw)
    led = second["ledger"]
    assert led["steps"] == 7 and len(led["history"]) == 2  # the inherited ledger continues
    assert first["ledger"]["epsilon"] < led["epsilon"] <= 4.0


def test_steps_with_empty_poisson_batches_still_count_and_add_noise(data_dir):
    """q = 1/5000: most steps sample nobody; each still adds noise, moves the weights and is accounted."""
    r = zoo.train("test-wrn10-1", data_dir=data_dir, seed=5, batch_size=1, train_subset=5000, steps=3,
                  test_subset=50, **QUIET)
    assert r["ledger"]["steps"] == 3 and r["ledger"]["epsilon"] <= 8.0
    from zoo.dp.step import poisson_batch, step_generator

    sizes = [len(poisson_batch(5000, 1 / 5000, step_generator(5, s, "sample", torch.device("cpu")))) for s in range(3)]
    assert 0 in sizes  # the run really met empty batches
    torch.manual_seed(5)
    start = zoo.create_model("test-wrn10-1")  # the same initialisation as the run (seeded before building)
    moved = [not torch.equal(a, b) for a, b in zip(start.state_dict().values(), r["model_object"].state_dict().values())]
    assert all(moved)


def test_training_refuses_a_model_with_the_wrong_head(data_dir):
    from zoo.training.engine import _run
    from zoo.catalog.registry import get_card

    card = get_card("test-wrn10-1")
    with pytest.raises(ValueError, match="classes"):
        _run(zoo.create_model("test-wrn10-1", num_classes=3), model_name="x", card=card, recipe=card["recipe"],
             ledger=None, out_dir=None, data_dir=data_dir, seed=0, device="cpu", checkpoint_every=None,
             test_subset=None, progress=False, resume=False, download=False)


def test_sparse_model_on_pneumonia_resumes_exactly_and_keeps_its_arguments(data_dir, tmp_path):
    """Gate draws come from the per-step seeded RNG, so a resumed L0 run equals an uninterrupted one; the
    model is built for the data set's channels and classes, and ``model_args`` travel with the checkpoint."""
    kw = dict(data_dir=data_dir, seed=5, steps=4, checkpoint_every=2, dataset="pneumoniamnist", batch_size=64,
              physical_batch_size=64, augmult=2, model_args={"l0_lambda": 0.3}, **QUIET)
    a, _, ta = _interrupted_run_resumes_exactly("test-wrn10-1-l0", tmp_path, **kw)
    assert any("log_alpha" in k for k in ta)
    model, _ = load_checkpoint(tmp_path / "a" / "final.safetensors")
    assert (model.in_chans, model.num_classes, model.l0_lambda) == (1, 2, 0.3)
    assert a["dataset"] == "pneumoniamnist"


def test_segmentation_on_isbi_trains_resumes_exactly_and_reports_dice_per_class(data_dir, tmp_path):
    """The card's recipe of test-eq-unet-c4-w4: ISBI resized to 64x64, 32x32 crops with joint augmentation
    (D4 grid actions for EM), 2 views per sample. A resumed run equals an uninterrupted one, the final
    checkpoint evaluates to the reported metrics, and the ledger is within the budget."""
    kw = dict(data_dir=data_dir, seed=2, steps=4, checkpoint_every=2, **QUIET)
    a, _, _ = _interrupted_run_resumes_exactly("test-eq-unet-c4-w4", tmp_path, **kw)
    test = a["test"]
    assert {"dice", "iou", "dice_cell", "dice_membrane", "iou_cell", "iou_membrane"} <= set(test)
    assert all(0 <= test[k] <= 1 for k in ("dice", "iou", "dice_membrane", "iou_cell"))
    assert test["dice"] == test["dice_membrane"]  # the mean over the foreground classes (one here)
    assert a["dataset"] == "isbi2012" and a["ledger"]["steps"] == 4 and a["ledger"]["epsilon"] <= 8.0
    model, _ = load_checkpoint(tmp_path / "a" / "final.safetensors")
    data = get_dataset_info("isbi2012").load("test", data_dir=data_dir).resized(64)
    assert evaluate(model, data)["dice"] == pytest.approx(test["dice"])


def test_noise_free_reference_run_is_marked_as_such(data_dir, tmp_path):
    """epsilon = inf: sigma = 0, the ledger says epsilon = inf, and the checkpoint still loads and verifies."""
    r = zoo.train("test-unet-w4", data_dir=data_dir, seed=0, steps=2, epsilon=float("inf"), out_dir=tmp_path,
                  **QUIET)
    assert r["noise_multiplier"] == 0.0 and r["ledger"]["epsilon"] == float("inf")
    _, sidecar = load_checkpoint(tmp_path / "final.safetensors")
    assert sidecar["ledger"]["epsilon"] == float("inf")


def test_models_and_data_of_different_tasks_are_refused(data_dir):
    with pytest.raises(ValueError, match="classification model but isbi2012 is a segmentation data set"):
        zoo.train("test-wrn10-1", dataset="isbi2012", data_dir=data_dir, steps=1, **QUIET)
    with pytest.raises(ValueError, match="segmentation model but cifar10 is a classification data set"):
        zoo.train("test-unet-w4", dataset="cifar10", data_dir=data_dir, steps=1, **QUIET)
    with pytest.raises(ValueError, match=r"\['crop'\] do not apply to classification"):
        zoo.train("test-wrn10-1", data_dir=data_dir, steps=1, crop=16, **QUIET)


def test_crops_the_model_cannot_take_are_refused_before_training(data_dir):
    with pytest.raises(ValueError, match="crop 128 is larger than the 64x64"):
        zoo.train("test-unet-w4", data_dir=data_dir, crop=128, steps=1, **QUIET)
    with pytest.raises(ValueError, match="divisible by 4, but the training crop is 30"):
        zoo.train("test-unet-w4", data_dir=data_dir, crop=30, steps=1, **QUIET)
    r = zoo.train("test-unet-w4", data_dir=data_dir, crop=None, steps=1, seed=0, **QUIET)  # None: whole images
    assert r["recipe"]["crop"] is None


def test_pneumonia_reports_balanced_accuracy_and_roc_auc(data_dir):
    """PneumoniaMNIST's test split is imbalanced (234 normal, 390 pneumonia): accuracy alone would reward
    predicting pneumonia everywhere, so the metrics include balanced accuracy and ROC-AUC."""
    r = zoo.train("test-wrn10-1", dataset="pneumoniamnist", data_dir=data_dir, seed=0, steps=3, batch_size=64,
                  physical_batch_size=64, augmult=1, train_subset=None, **QUIET)
    test = r["test"]
    assert test["num_samples"] == 624 and 0 <= test["balanced_accuracy"] <= 1 and 0 <= test["roc_auc"] <= 1
    labels = get_dataset_info("pneumoniamnist").load("test", data_dir=data_dir).labels
    assert labels.bincount().tolist() == [234, 390]
    model = r["model_object"]
    again = evaluate(model, get_dataset_info("pneumoniamnist").load("test", data_dir=data_dir))
    assert again["roc_auc"] == pytest.approx(test["roc_auc"]) and again["accuracy"] == pytest.approx(test["accuracy"])


def test_x_rays_are_resized_for_the_equivariant_pneumonia_model_and_28_is_refused(data_dir):
    """eq-resnet9 is exactly invariant only at sizes divisible by 8: its pneumonia card resizes 28 -> 32, and
    without the resize training stops before the first step with an error that says what to do."""
    kw = dict(data_dir=data_dir, seed=0, steps=1, batch_size=16, physical_batch_size=16, augmult=1, test_subset=50,
              **QUIET)
    r = zoo.train("test-eq-resnet9-c4", dataset="pneumoniamnist", delta=1e-4, resize=32, **kw)
    assert r["recipe"]["resize"] == 32 and r["test"]["num_samples"] == 50
    with pytest.raises(ValueError, match="divisible by 8.*resize"):
        zoo.train("test-eq-resnet9-c4", dataset="pneumoniamnist", delta=1e-4, **kw)
    with pytest.raises(ValueError, match="crop.*do not apply to classification"):
        zoo.train("test-wrn10-1", crop=16, **kw)


def test_cosine_factor_is_torchs_cosine_annealing():
    """zoo.schedule's cosine is torch's CosineAnnealingLR (T_max = the planned steps) step by step; constant is 1."""
    from zoo.schedule import lr_factor

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    for t in range(7):
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * lr_factor("cosine", t, 7), abs=1e-12)
        assert lr_factor("constant", t, 7) == lr_factor(None, t, 7) == 1.0
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'.*constant, cosine"):
        lr_factor("step", 0, 7)


def test_cosine_schedule_resumes_exactly_and_changes_the_run(data_dir, tmp_path):
    """The lr of each step is a function of the step alone, so a resumed cosine run equals the uninterrupted
    one; it is applied (the weights differ from the constant-lr run of the same seed), and recorded."""
    kw = dict(data_dir=data_dir, seed=3, steps=4, checkpoint_every=2, test_subset=200, lr_schedule="cosine", **QUIET)
    a, _, ta = _interrupted_run_resumes_exactly("test-wrn10-1", tmp_path, **kw)
    assert a["recipe"]["lr_schedule"] == "cosine"
    zoo.train("test-wrn10-1", out_dir=tmp_path / "c", **{**kw, "lr_schedule": None})
    tc = _final_tensors(tmp_path / "c")
    assert any(not torch.allclose(ta[k], tc[k]) for k in ta)
    with pytest.raises(ValueError, match="lr_schedule: got 'linear'"):
        zoo.train("test-wrn10-1", **{**kw, "lr_schedule": "linear"})
