"""Tasks (zoo.data.tasks): the segmentation loss is per sample, the metrics are the textbook ones, bad masks are refused."""
from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.privacy import Ledger, compute_epsilon
from zoo.data.tasks import confusion_counts, dice_iou, get_task, task_of
from zoo.dp.objectives import dice_ce_loss


def test_dice_and_iou_match_hand_counts():
    truth = torch.tensor([[0, 1, 1], [0, 1, 0]])
    pred = torch.tensor([[0, 1, 0], [1, 1, 0]])
    counts = confusion_counts(pred, truth, 2)  # class 1: TP 2 (two shared ones), FP 1, FN 1
    assert counts.tolist() == [[2, 1, 1], [2, 1, 1]]
    dice, iou = dice_iou(counts)
    assert dice[1].item() == pytest.approx(4 / 6) and iou[1].item() == pytest.approx(2 / 4)
    absent = dice_iou(confusion_counts(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 2))
    assert absent[0][1].item() == 1.0 and absent[1][1].item() == 1.0  # a class absent from both counts as perfect


def test_dice_ce_loss_is_per_sample_and_vanishes_on_a_confident_correct_prediction():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)
    batch = dice_ce_loss(logits, masks)
    assert batch.shape == (4,)
    for i in range(4):  # sample i's loss does not depend on the other samples
        assert torch.allclose(dice_ce_loss(logits[i:i + 1], masks[i:i + 1])[0], batch[i])
    perfect = 50 * torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    assert dice_ce_loss(perfect, masks).max() < 1e-6
    assert (batch > 0.5).all()


@pytest.mark.parametrize("bad, match", [
    (lambda x, y: (x, y.float()), "int64"),
    (lambda x, y: (x, y[:, :4]), r"\[B,H,W\]"),
    (lambda x, y: (x, y + 2), "out of range"),
    (lambda x, y: (x.masked_fill(x > 2, float("nan")), y), "NaN"),
    (lambda x, y: (x[:, :1].repeat(1, 3, 1, 1), y), "channels|\\[B,1,H,W\\]"),
])
def test_bad_segmentation_batches_are_refused(bad, match):
    model = zoo.create_model("test-unet-w4")
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 2, (2, 8, 8))
    x[0, 0, 0, 0] = 3.0
    with pytest.raises((ValueError, TypeError), match=match):
        zoo.per_sample_gradients(model, *bad(x, y))


def test_models_and_tasks_agree():
    assert task_of(zoo.create_model("test-unet-w4")) is get_task("segmentation")
    assert task_of(zoo.create_model("test-wrn10-1")) is get_task("classification")
    assert zoo.model_info("unet-w16")["task"] == "segmentation" and zoo.model_info("wrn16-4")["task"] == "classification"
    with pytest.raises(ValueError, match="unknown task"):
        get_task("detection")


def test_segmenter_input_size_must_be_a_multiple_of_its_downsampling():
    model = zoo.create_model("test-unet-w4")  # two poolings: multiples of 4
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 18, 18))


def test_noise_free_steps_have_no_guarantee():
    """The epsilon=inf reference (sigma = 0) spends an infinite epsilon, and the ledger says so."""
    assert compute_epsilon([(0.0, 0.5, 3)], 1e-4) == math.inf
    ledger = Ledger(dataset="isbi2012", num_samples=20, delta=1e-4, accountant="rdp", clip_norm=1.0,
                    target_epsilon=math.inf)
    assert ledger.steps_left(0.0, 0.5, 10) == 10
    ledger.record(0.0, 0.5, 10)
    assert ledger.epsilon() == math.inf and Ledger.from_dict(ledger.to_dict()).steps == 10


def test_roc_auc_equals_the_pairwise_definition_with_ties():
    from zoo.data.tasks import binary_auc, roc_auc

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200,), generator=g).double()  # many ties
    positive = torch.rand(200, generator=g) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()
    assert binary_auc(scores, positive) == pytest.approx(pairwise, abs=1e-12)
    assert binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert math.isnan(binary_auc(scores, torch.zeros(200, dtype=torch.bool)))
    probs = torch.rand(60, 3, generator=g).softmax(1).double()
    labels = torch.randint(0, 3, (60,), generator=g)
    ovr = [binary_auc(probs[:, c], labels == c) for c in range(3)]
    assert roc_auc(probs, labels) == pytest.approx(sum(ovr) / 3)


def test_balanced_accuracy_averages_recall_over_present_classes():
    from zoo.data.tasks import balanced_accuracy

    labels = torch.tensor([0, 0, 0, 0, 1, 1])  # imbalanced: predicting 0 everywhere has accuracy 4/6
    assert balanced_accuracy(torch.zeros(6, dtype=torch.long), labels, 3) == pytest.approx(0.5)
    assert balanced_accuracy(torch.tensor([0, 0, 1, 1, 1, 0]), labels, 2) == pytest.approx((2 / 4 + 1 / 2) / 2)


def _fixed_logits_model(logits: torch.Tensor) -> torch.nn.Module:
    """A real (linear) classifier whose outputs ignore the image: weights 0, bias ``logits``."""
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(len(logits)))
    m(torch.zeros(1, 1, 4, 4))
    with torch.no_grad():
        m[1].weight.zero_()
        m[1].bias.copy_(logits)
    return m


def _imbalanced(n_per_class, k):
    from zoo.data import ImageDataset

    class Info:
        name, num_classes, in_chans, mean, std = "toy", k, 1, (0.5,), (0.5,)
        classes = tuple(f"c{i}" for i in range(k))

    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    return ImageDataset(torch.zeros(len(y), 1, 4, 4, dtype=torch.uint8), y, Info())


def test_a_constant_classifier_is_called_one_and_the_baseline_is_given():
    from zoo.data.tasks import get_task

    data = _imbalanced([30, 70], 2)
    m = get_task("classification").evaluate(_fixed_logits_model(torch.tensor([0.0, 1.0])), data, 64, "cpu", False)
    assert m["accuracy"] == pytest.approx(0.7) and m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["baseline"]["accuracy"] == pytest.approx(0.7) and m["baseline"]["balanced_accuracy"] == 0.5
    assert "c1" in m["baseline"]["rule"] and m["degenerate"]
    assert any("constant predictions: 100% of the test images are predicted 'c1'" in w for w in m["warnings"])
    assert any("does not beat chance" in w for w in m["warnings"])
    assert m["confusion_matrix"] == [[0, 30], [0, 70]] and m["per_class_recall"] == {"c0": 0.0, "c1": 1.0}


def test_a_classifier_that_learned_gets_no_warning_and_three_classes_get_the_full_report():
    from zoo.data.tasks import honesty_report

    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 20)
    pred = y.clone()
    pred[:2] = 1  # two of class 0 mistaken for class 1
    metrics = {"accuracy": (pred == y).double().mean().item(), "balanced_accuracy": (0.8 + 1 + 1) / 3}
    r = honesty_report(pred, y, 3, metrics, ("a", "b", "c"))
    assert r["warnings"] == [] and not r["degenerate"]
    assert r["roc_auc_kind"] == "macro one-vs-rest"
    assert r["per_class_recall"] == {"a": 0.8, "b": 1.0, "c": 1.0}
    assert r["confusion_matrix"] == [[8, 2, 0], [0, 10, 0], [0, 0, 20]]
    assert r["baseline"]["accuracy"] == 0.5 and r["baseline"]["balanced_accuracy"] == pytest.approx(1 / 3)
