"""The studies of eval/ (sparsity, segmentation, alignment, pneumonia, CIFAR-10 TAN) end to end on real data, at
smoke-test size."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "study_sparsity.py"


def run(out: Path, data_dir: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--config", "cpu", "--out", str(out), "--runs",
                           str(out / "runs"), "--data-dir", str(data_dir), "--steps", "2", "--limit", str(limit)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)


def test_study_writes_rows_and_a_plot_and_resumes_without_redoing_them(data_dir, tmp_path):
    run(tmp_path, data_dir, limit=2)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 2 and (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 0
    assert {r["l0_lambda"] for r in rows} == {"0.0", "0.1"} and all(r["steps"] == "2" for r in rows)
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["epsilon_spent"]) <= float(r["epsilon"]) for r in rows)
    second = run(tmp_path, data_dir, limit=1)
    rows2 = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows2[:2] == rows and len(rows2) == 3  # the finished rows were kept and skipped, one new row added
    assert second.stderr.count("done, skipped") == 2


def test_sparsity_budget_compares_gated_networks_with_their_dense_twin_and_times_the_pruned_ones(data_dir, tmp_path):
    """The budget config: the dense twin (no gates) and a gated network at TAN's proposed privacy, a table that
    sets each against the twin, and bench_prune timing the trained gated run against its pruned and dense forms."""
    subprocess.run([sys.executable, str(SCRIPT), "--config", "budget", "--datasets", "pneumoniamnist", "--out",
                    str(tmp_path), "--runs", str(tmp_path / "runs"), "--data-dir", str(data_dir), "--steps", "2",
                    "--limit", "2"], capture_output=True, text=True, check=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    dense, gated = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert (dense["setting"], dense["l0"], dense["open_fraction"]) == ("dense", "0", "1.0")
    assert dense["params"] == dense["params_pruned"] == gated["params_pruned"]  # all gates open: pruned = the twin
    assert int(gated["params"]) > int(dense["params"]) and gated["l0"] == "1" and gated["setting"] == "l0lambda0.01"
    assert dense["batch_size"] == gated["batch_size"] == "371"  # zoo.privacy.tan.propose(8, 1e-4, 4708, 400, 1)
    table = (tmp_path / "results.md").read_text()
    assert "accuracy − dense" in table and "| dense |" in table and "| l0lambda0.01 |" in table
    bench = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_prune.py"), "--runs", str(tmp_path / "runs"),
                            "--batch-size", "4", "--repeats", "1",
                            "--markdown", str(tmp_path / "bench" / "results.md")],
                           capture_output=True, text=True, check=True)
    lines = [ln for ln in bench.stdout.splitlines() if ln.startswith("budget-")]
    assert [ln.split()[0] for ln in lines] == ["budget-pneumoniamnist-eps8-l0lambda0.01"]  # the dense run is no case
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "| budget-pneumoniamnist-eps8-l0lambda0.01 |" in md and "--batch-size 4" in md and "load average" in md
    # a complete run whose row was lost (the study stopped between the run's end and its row) is read back
    with (tmp_path / "results.csv").open() as fh:
        head, first, _ = fh.read().splitlines()
    (tmp_path / "results.csv").write_text(f"{head}\n{first}\n")
    again = subprocess.run([sys.executable, str(SCRIPT), "--config", "budget", "--datasets", "pneumoniamnist", "--out",
                            str(tmp_path), "--runs", str(tmp_path / "runs"), "--data-dir", str(data_dir), "--steps",
                            "2", "--limit", "1"], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert "is complete: reading its result" in again.stderr
    back = list(csv.DictReader((tmp_path / "results.csv").open()))[1]
    assert {k: back[k] for k in ("setting", "accuracy", "params_pruned", "train_time_s")} == \
        {k: gated[k] for k in ("setting", "accuracy", "params_pruned", "train_time_s")}


SEG_SCRIPT = SCRIPT.parent / "study_segmentation.py"


def run_seg(out: Path, data_dir: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SEG_SCRIPT), "--config", "cpu", "--out", str(out), "--runs",
                           str(out / "runs"), "--data-dir", str(data_dir), "--models", "test-unet-w4",
                           "--datasets", "isbi2012", "--epsilons", "inf", "8", "--steps", "2", "--limit", str(limit)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)


def test_segmentation_study_writes_csv_plot_and_table_and_resumes(data_dir, tmp_path):
    run_seg(tmp_path, data_dir, limit=1)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["epsilon"] == "inf" and float(rows[0]["sigma"]) == 0.0
    run_seg(tmp_path, data_dir, limit=5)
    rows2 = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows2[:1] == rows and [r["epsilon"] for r in rows2] == ["inf", "8.0"]  # the first row was not redone
    dp = rows2[1]
    assert 0 < float(dp["sigma"]) and float(dp["epsilon_spent"]) <= 8.0 and dp["steps"] == "2"
    assert all(0 <= float(r[k]) <= 1 for r in rows2 for k in ("dice", "iou", "dice_0", "iou_1"))
    assert float(dp["psg_mib"]) == int(dp["params"]) * 4 * 10 * 2 / 2 ** 20  # physical batch 10 x 2 views, float32
    assert (tmp_path / "dice_vs_epsilon.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "| `test-unet-w4` | width 2 |" in table and "ε = ∞" in table and "ε = 8" in table
    assert "predicting foreground everywhere scores 0." in table


def test_a_sparsity_setting_with_its_own_initial_drop_rate_is_named_and_built_with_it(monkeypatch):
    """The CIFAR-10 control of the gates' mask noise: ``l0_drop_rate`` reaches the gates and names the setting."""
    import torch

    import zoo
    from zoo.nn.sparse import gate_modules

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_sparsity import gated, label

    assert label(gated(0.006, 30.0)) == "l0lambda0.006-k30" and label(gated(0.01)) == "l0lambda0.01"
    setting = gated(0.006, 30.0, drop_rate=0.05)
    assert label(setting) == "l0lambda0.006-k30-drop0.05"
    for args, drop in ((setting, 0.05), (gated(0.006, 30.0), 0.3)):
        alpha = gate_modules(zoo.create_model("test-wrn10-1-l0", **args))[0].log_alpha
        torch.testing.assert_close(torch.sigmoid(alpha), torch.full_like(alpha, 1 - drop))


def test_the_segmentation_study_does_not_count_its_own_releases_as_architectures(monkeypatch):
    """A release card of the study (its network trained for one data set) is not another architecture to study."""
    import zoo

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_segmentation import segmentation_models, study_command

    models = segmentation_models()
    assert {"unet-w16", "eq-unet-d4-w16", "deeplabv3plus-w16", "linknet-w16", "unetpp-w16"} <= set(models)
    for name in zoo.list_models():
        info = zoo.model_info(name)
        release = study_command("budget") in info["recipe"]["source"]
        assert (name in models) == (info["task"] == "segmentation" and not name.startswith("test-") and not release)


def test_beyond_edge_searches_past_the_edge_of_the_grid_that_scores_best(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_segmentation import beyond_edge

    grid = [0.25, 0.5, 1.0]
    assert beyond_edge(grid, 0.25) == 0.125 and beyond_edge(grid, 1.0) == 2.0
    assert beyond_edge(grid, 0.5) is None and beyond_edge(grid, None) is None
    assert beyond_edge([0.125, 0.25, 0.5, 1.0], 0.25) is None and beyond_edge([0.5], 0.5) is None


def test_the_lr_search_reads_only_its_scores_so_a_resumed_study_searches_the_same_lrs(monkeypatch):
    """A study stopped after the first lr past the grid's edge, the extension scoring best, goes on to the second
    one when it resumes (it once compared the best lr with the grid alone and stopped there)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_segmentation import next_search_lr

    grid = [0.25, 0.5, 1.0]
    assert next_search_lr(grid, {}, 2) == 0.25 and next_search_lr(grid, {0.25: 0.5}, 2) == 0.5
    done = {0.25: 0.65, 0.5: 0.61, 1.0: 0.57}
    assert next_search_lr(grid, done, 2) == 0.125 and next_search_lr(grid, done, 0) is None
    assert next_search_lr(grid, {**done, 0.125: 0.72}, 2) == 0.0625  # the resumed case
    assert next_search_lr(grid, {**done, 0.125: 0.72}, 1) is None  # the extensions are spent
    assert next_search_lr(grid, {**done, 0.125: 0.60}, 2) is None  # the best lies inside now
    assert next_search_lr(grid, {**done, 0.125: 0.72, 0.0625: 0.73}, 2) is None
    assert next_search_lr(grid, {0.25: 0.1, 0.5: 0.2, 1.0: 0.3}, 2) == 2.0


def test_equal_search_scores_choose_the_smallest_lr_so_a_diverged_network_is_searched_downward(monkeypatch):
    """A network that scores 0 at every lr (the D4 U-Net on ISBI 2012) goes on downward, as far as the search may
    extend; the search once took the first lr tried, 0.25, and stopped after one step down."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_segmentation import best_lr, next_search_lr

    grid = [0.25, 0.5, 1.0]
    zeros = {0.5: 0.0, 1.0: 0.0, 0.25: 0.0, 0.125: 0.0}
    assert best_lr(zeros) == 0.125 and best_lr({0.5: 0.3, 0.25: 0.2}) == 0.5
    assert next_search_lr(grid, zeros, 4) == 0.0625
    assert next_search_lr(grid, {**zeros, 0.0625: 0.0, 0.03125: 0.0, 0.015625: 0.0}, 4) is None


def _study(script: str, out: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT.parent / script), "--config", "cpu", "--out", str(out),
                           "--runs", str(out / "runs"), "--data-dir", str(data_dir), "--steps", "2", *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)


def test_alignment_study_compares_the_variants_at_equal_epsilon(data_dir, tmp_path):
    _study("study_alignment.py", tmp_path, data_dir, "--datasets", "pneumoniamnist", "--weights", "1",
                   "--seeds", "0")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["align"] for r in rows] == ["off", "all", "subset"]
    assert len({(r["sigma"], r["epsilon_spent"], r["steps"]) for r in rows}) == 1  # same privacy cost
    assert all(0 <= float(r[m]) <= 1 for r in rows for m in ("accuracy", "balanced_accuracy", "roc_auc"))
    assert (tmp_path / "alignment.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert table.count("| pneumoniamnist |") == 3 and "| subset | 1 | 0.1 |" in table
    again = _study("study_alignment.py", tmp_path, data_dir, "--datasets", "pneumoniamnist", "--weights", "1",
                   "--seeds", "0")
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 3 and "[1/3]" not in again.stderr


def test_pneumonia_study_fine_tunes_a_cifar10_checkpoint_and_trains_from_scratch(data_dir, tmp_path):
    _study("study_pneumonia.py", tmp_path, data_dir, "--models", "wrn16-1-pneumonia", "--epsilons", "3")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["start"] for r in rows] == ["scratch", "cifar10"]
    assert rows[0]["pretrain_epsilon"] == "" and 0 < float(rows[1]["pretrain_epsilon"]) <= 8
    assert rows[0]["sigma"] == rows[1]["sigma"] and all(float(r["epsilon_spent"]) <= 3 for r in rows)
    assert (tmp_path / "runs" / "pretrain-wrn16-1-seed0" / "final.safetensors").exists()
    table = (tmp_path / "results.md").read_text()
    assert "| `wrn16-1-pneumonia` | scratch |" in table and "| `wrn16-1-pneumonia` | cifar10 |" in table
    assert (tmp_path / "metrics_vs_epsilon.png").stat().st_size > 0


def test_tan_study_runs_an_unsearched_recipe_at_its_given_point_over_the_full_seeds(data_dir, tmp_path, monkeypatch):
    """A model entry with ``search`` False (the end-to-end releases' recipes) gets no search rows and full runs of
    its one given point, one per full seed; a rerun redoes nothing."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import study_cifar10

    cfg = {"dataset": "cifar10", "n": 50_000, "delta": 1e-5, "epsilons": [8.0], "metric": "accuracy",
           "search_seeds": [0], "full_seeds": [0, 1], "min_sim_sigma": 0.5, "max_shrink": 8,
           "models": {"test-wrn10-1": {"fixed": {"physical_batch_size": 8, "augmult": 1}, "full": True,
                                       "search": False, "points": [(8, 2, 0.1), (16, 2, 0.1)]}}}
    monkeypatch.setitem(study_cifar10.CONFIGS, "test-e2e", cfg)
    argv = ["study_cifar10.py", "--config", "test-e2e", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"),
            "--data-dir", str(data_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    assert study_cifar10.main() == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["stage"], r["full_batch_size"], r["steps"], r["seed"]) for r in rows] == [
        ("full", "8", "2", "0"), ("full", "8", "2", "1")]
    assert all(float(r["epsilon_spent"]) <= 8.0 for r in rows)
    assert study_cifar10.main() == 0
    assert list(csv.DictReader((tmp_path / "results.csv").open())) == rows


def test_segmentation_budget_study_searches_with_tan_then_runs_the_chosen_lr(data_dir, tmp_path, monkeypatch):
    """The budget configuration: TAN simulations at B / 2 (same steps and sigma / B, so they spend more than the
    target epsilon) over the lrs, then full runs at the lr whose simulation scored best, at the search epsilon and
    its deciding seeds before the other epsilons; every architecture at the config's arguments; a transfer variant
    without its public source run is skipped, not failed; a best lr at an edge of the grid is searched past
    (beyond_edge)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_segmentation import CONFIGS, beyond_edge

    extend = CONFIGS["budget"]["search"]["extend"]
    limit = 3 + extend + 1  # the whole search, then at least one full run
    args = [sys.executable, str(SEG_SCRIPT), "--config", "budget", "--out", str(tmp_path), "--runs",
            str(tmp_path / "runs"), "--data-dir", str(data_dir), "--models", "test-unet-w4", "--datasets",
            "isbi2012", "--epsilons", "inf", "8", "--steps", "1", "--limit", str(limit)]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                          check=True)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    search, full = [r for r in rows if r["stage"] == "search"], [r for r in rows if r["stage"] == "full"]
    assert [r["stage"] for r in rows] == ["search"] * len(search) + ["full"] * len(full)
    assert len(full) == limit - len(search)
    # the search epsilon first, its deciding seeds next, the other epsilons last
    order = [(8.0, "0"), (8.0, "1"), (8.0, "2"), (math.inf, "0")]
    assert [(float(r["epsilon"]), r["seed"]) for r in full] == order[:len(full)]
    lrs = [float(r["lr"]) for r in search]
    leader = [float(max(search[:i], key=lambda r: float(r["dice"]))["lr"]) for i in range(1, len(search) + 1)]
    assert lrs[:3] == [0.25, 0.5, 1.0] and len(lrs) <= 3 + extend  # the grid, then at most `extend` lrs past it
    assert all(lrs[i] == beyond_edge(lrs[:i], leader[i - 1]) for i in range(3, len(lrs)))
    assert len(lrs) == 3 + extend or beyond_edge(lrs, leader[-1]) is None  # it stops once the best lies inside
    assert all(r["batch_size"] == "10" and r["full_batch_size"] == "20" and float(r["epsilon_spent"]) > 8
               for r in search)
    best = max(search, key=lambda r: float(r["dice"]))  # the first of equals, as max keeps it
    assert all(r["lr"] == best["lr"] and r["batch_size"] == "20" for r in full)
    assert all(r["model_args"] == "{'width': 4, 'depth': 3}" and int(r["view_pixels"]) > 0 for r in rows)
    assert "from-weizmann-horse-head_norm-eps8-seed0-lr0.25 skipped: no noise-free weizmann-horse run" in done.stderr
    table = (tmp_path / "results.md").read_text()
    assert "`test-unet-w4`" in table and "TAN's simulation on **isbi2012** (B = 10 of 20, S = 1" in table
    assert f"**{float(best['dice']):.3f}**" in table.split("TAN's simulation on")[1]  # the chosen lr's cell


def test_tan_propose_runs_its_recipe_at_the_searched_lr_and_tables_it_beside_the_searched_one(data_dir, tmp_path,
                                                                                             monkeypatch):
    """TAN without model knowledge: B and S from zoo.dp.tan.propose alone (epsilon, delta, N), the lr of the best
    recipe that the named study's search found; the table sets both full-privacy results side by side."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_cifar10 import CONFIGS, best_points, searched
    from zoo.dp.tan import propose

    done = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "study_cifar10.py"), "--config", "tan-propose-pneumonia", "--stage",
         "full", "--models", "scatternet-cnn-pneumonia", "--epsilons", "8", "--steps", "2", "--out", str(tmp_path),
         "--runs", str(tmp_path / "runs"), "--data-dir", str(data_dir)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    p = propose(8.0, 1e-4, 4_708)
    lr = best_points(searched("pneumonia-scatternet"), "pneumonia-scatternet", "balanced_accuracy")[
        "scatternet-cnn-pneumonia", 8.0][2]
    assert len(rows) == len(CONFIGS["tan-propose-pneumonia"]["full_seeds"]) and "propose's recipe" in done.stderr
    assert all(int(r["full_batch_size"]) == p["batch_size"] and float(r["lr"]) == lr and r["steps"] == "2"
               for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert "| `scatternet-cnn-pneumonia` | 8 | propose | 445 | 2 |" in table
    assert "| `scatternet-cnn-pneumonia` | 8 | searched (`--config pneumonia-scatternet`) | 1024 | 200 |" in table


def test_l0_gate_signal_reports_signal_noise_and_penalty_from_real_per_sample_gradients(data_dir, tmp_path):
    """eval/l0_gate_signal.py: the noise is sigma C / B as given, the penalty grows linearly in lambda, and a gate
    scale k multiplies the signal-to-noise ratio by k."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "l0_gate_signal.py"), "--model", "test-wrn10-1-l0", "--n", "4",
         "--batch-size", "100", "--steps", "10", "--sigma", "2", "--clip", "1", "--l0-lambdas", "0.1", "1",
         "--scales", "1", "10", "--data-dir", str(data_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True).stdout
    assert "noise per coordinate of the averaged gradient, σC/B: 2.00e-02" in out
    penalty, scale = out.split("| λ |")[1].split("Gate scale k")
    cheap = [float(line.split(" | ")[1].split()[0]) for line in penalty.splitlines()[2:4]]  # lambda 0.1, then 1
    assert cheap[1] == pytest.approx(10 * cheap[0], rel=1e-2)
    snr = [float(line.split(" | ")[2]) for line in scale.splitlines() if line.startswith(("| 1 |", "| 10 |"))]
    assert snr[1] == pytest.approx(10 * snr[0], rel=0.05)
    assert (tmp_path / "results.md").read_text() in out + "\n"


def test_l0_gate_signal_gates_a_dense_card_through_model_args_and_refuses_one_without_gates(data_dir, tmp_path):
    """--model-args builds the card with gates (the sparsity study's wrn16-1 twins); without gates it says how."""
    base = [sys.executable, str(SCRIPT.parent / "l0_gate_signal.py"), "--model", "test-wrn10-1", "--n", "2",
            "--batch-size", "100", "--steps", "10", "--sigma", "2", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    refused = subprocess.run(base, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "has no L0 gates" in refused.stderr and '"l0": true' in refused.stderr
    out = subprocess.run([*base, "--model-args", '{"l0": true, "l0_gate_scale": 10}'], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "--model-args '{\"l0\": true, \"l0_gate_scale\": 10}'" in out and " gates." in out


def _seg_row(dataset, model, dice, seed, eps=8.0, stage="full", start="scratch", lr=0.125):
    return {"config": "budget", "stage": stage, "dataset": dataset, "model": model, "start": start,
            "trainable": "all", "lr": str(lr), "epsilon": str(eps), "seed": str(seed), "dice": str(dice),
            "iou": str(dice - 0.1), "model_args": "{'width': 4, 'depth': 3}"}


def test_the_cells_that_decide_the_ranking_stay_the_same_once_their_seeds_have_run(monkeypatch):
    """deciding() ranks by the first seed at the chosen lr alone: later seeds (here, poor ones) and a run at an lr
    the search no longer chooses do not change which cells get more seeds."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from study_segmentation import deciding

    horse = "weizmann-horse"
    models = {"unet-w16": 0.73, "linknet-w16": 0.70, "deeplabv3plus-w16": 0.72, "unetpp-w16": 0.69,
              "eq-unet-d4-w16": 0.65}
    rows = [_seg_row(horse, m, d, 0) for m, d in models.items()]
    lrs = {(horse, m, "scratch", "all"): 0.125 for m in models}
    first = deciding(rows, "budget", horse, 8.0, 3, 0, lrs)
    assert first == [("unet-w16", "scratch", "all"), ("deeplabv3plus-w16", "scratch", "all"),
                     ("linknet-w16", "scratch", "all"), ("eq-unet-d4-w16", "scratch", "all")]
    later = rows + [_seg_row(horse, m, 0.1, s) for m, *_ in first for s in (1, 2)]
    later += [_seg_row(horse, "unetpp-w16", 0.99, 0, lr=1.0)]  # an lr that the search did not choose
    assert deciding(later, "budget", horse, 8.0, 3, 0, lrs) == first

def test_segmentation_release_picks_the_best_decided_network_and_an_equivariant_one_within_0_02(monkeypatch):
    """The release stage reads the budget study: only cells with 2 or more seeds at epsilon 8 compete (a single
    lucky seed does not), the best mean Dice wins, the equivariant network joins it when within 0.02."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from release_cpu import segmentation_name, segmentation_picks

    horse = "weizmann-horse"
    rows = [_seg_row(horse, "unet-w16", d, s) for s, d in enumerate((0.74, 0.75, 0.76))]
    rows += [_seg_row(horse, "linknet-w16", d, s) for s, d in enumerate((0.70, 0.71, 0.72))]
    rows += [_seg_row(horse, "eq-unet-d4-w16", d, s, lr=0.0625) for s, d in enumerate((0.73, 0.735, 0.74))]
    rows += [_seg_row(horse, "deeplabv3plus-w16", 0.90, 0), _seg_row(horse, "unetpp-w16", 0.95, 0, eps=3.0),
             _seg_row(horse, "unetpp-w16", 0.95, 1, eps=3.0), _seg_row(horse, "unetpp-w16", 0.99, 0, stage="search"),
             _seg_row(horse, "unetpp-w16", 0.99, 1, stage="search")]
    picks = segmentation_picks(rows, horse)
    assert [(p["model"], p["lr"], len(p["rows"])) for p in picks] == [("unet-w16", 0.125, 3),
                                                                      ("eq-unet-d4-w16", 0.0625, 3)]
    assert picks[0]["mean"] == pytest.approx(0.75) and picks[1]["best"] == pytest.approx(0.75)
    assert picks[0]["std"] == pytest.approx(0.01) and picks[0]["model_args"] == {"width": 4, "depth": 3}
    far = [r if r["model"] != "eq-unet-d4-w16" else {**r, "dice": str(float(r["dice"]) - 0.02)} for r in rows]
    assert [p["model"] for p in segmentation_picks(far, horse)] == ["unet-w16"]  # 0.035 behind: not released
    with pytest.raises(SystemExit, match="no isbi2012 cell at epsilon 8 with 2 or more seeds"):
        segmentation_picks(rows, "isbi2012")
    assert segmentation_name("unet-w16", {"width": 4, "depth": 3}, horse) == "unet-w4-horse"
    assert segmentation_name("eq-unet-d4-w16", {"width": 4}, "isbi2012") == "eq-unet-d4-w4-isbi"


def test_segmentation_release_card_is_written_from_the_study_and_builds_its_network(tmp_path, monkeypatch):
    """The card of a segmentation release: the study's network and recipe at the chosen lr, the input size of the
    data set as trained, valid, registered in this process; written once, kept while the same."""
    import zoo
    from zoo.catalog import cards, registry

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from release_cpu import segmentation_card, segmentation_recipe

    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_UNCHECKED", set(registry._UNCHECKED))
    recipe = segmentation_recipe("weizmann-horse", 0.0625, 8.0, None)
    assert recipe["lr"] == 0.0625 and recipe["resize"] == 128 and recipe["batch_size"] == 32 and recipe["steps"] == 300
    assert "trainable" not in recipe and segmentation_recipe("isbi2012", 0.5, 8.0, "head+norm")["trainable"] == \
        "head+norm"
    args = dict(model="unet-w16", model_args={"width": 4, "depth": 3}, dataset="weizmann-horse", recipe=recipe,
                in_chans=3, source="the study", summary_tail="released at epsilon 8")
    name = segmentation_card(**args)
    card = json.loads((tmp_path / "unet-w4-horse.json").read_text())
    assert name == "unet-w4-horse" and card["args"] == {"width": 4, "depth": 3} and card["input_size"] == [3, 128, 128]
    assert card["recipe"]["lr"] == 0.0625 and card["recipe"]["source"] == "the study" and card["checkpoints"] == []
    assert card["summary"].startswith("U-Net at width 4, depth 3 (") and "background vs horse" in card["summary"]
    model = zoo.create_model(name, in_chans=3)
    assert model.num_classes == 2 and f"({sum(p.numel() for p in model.parameters()):,} parameters)" in card["summary"]
    assert segmentation_card(**{**args, "source": "reworded"}) == name  # the same recipe: the card is kept
    assert json.loads((tmp_path / "unet-w4-horse.json").read_text())["recipe"]["source"] == "the study"


def test_segmentation_release_trains_each_pick_as_the_study_did(tmp_path, monkeypatch):
    """The commands of the release stage, read from a study: a pick fine-tuned from horses starts from a noise-free
    horse checkpoint of the same network at the lr the study chose for it (trained, published as nonprivate, never
    a default), then fine-tunes with every recipe setting given (the horse card's resize 128 unset); a pick from
    scratch trains its own card; each private one is published as the default with the study's seed spread."""
    from zoo.catalog import cards, registry

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import release_cpu as rc

    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_UNCHECKED", set(registry._UNCHECKED))
    horse, isbi = "weizmann-horse", "isbi2012"
    rows = [_seg_row(horse, "unet-w16", d, 0, stage="search", lr=lr) for lr, d in ((0.125, 0.70), (0.0625, 0.73))]
    rows += [_seg_row(horse, "unet-w16", 0.80, 0, eps=math.inf, lr=0.125),  # an older lr's noise-free run
             _seg_row(horse, "unet-w16", 0.81, 0, eps=math.inf, lr=0.0625)]
    rows += [{**_seg_row(isbi, "unet-w16", d, s, start=horse, lr=0.5), "trainable": "head+norm"}
             for s, d in enumerate((0.70, 0.71, 0.72))]
    rows += [_seg_row(isbi, "eq-unet-d4-w16", d, s, lr=0.25) for s, d in enumerate((0.69, 0.70))]
    csv_path = tmp_path / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    calls = []
    monkeypatch.setattr(rc, "SEG_CSV", csv_path)
    monkeypatch.setattr(rc, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(rc, "published", lambda full: False)
    monkeypatch.setattr(rc, "run", lambda cmd, out: calls.append(("run", *cmd[len(rc.ZOO):])))
    monkeypatch.setattr(rc, "publish", lambda out, name, tag, default, note="", spread=None: calls.append(
        ("publish", name, tag, default, None if spread is None else spread["dice"][:2])))
    rc.segmentation_release(isbi)
    src = "unet-w4-horse.nonprivate_weizmann-horse"
    assert calls[:2] == [("run", "train", "unet-w4-horse", "--epsilon", "inf"),
                         ("publish", "unet-w4-horse", "nonprivate_weizmann-horse", False, None)]
    ft = calls[2]
    assert ft[:5] == ("run", "finetune", src, "--dataset", isbi)
    given = dict(zip(ft[5::2], ft[6::2]))
    assert given["--resize"] == "0" and given["--crop"] == "128" and given["--trainable"] == "head+norm"
    assert given["--lr"] == "0.5" and given["--epsilon"] == "8.0" and given["--batch-size"] == "20"
    assert calls[3][:4] == ("publish", "unet-w4-isbi", "dp_eps8", True)
    assert calls[3][4] == pytest.approx((0.01, 3))
    assert calls[4:] == [("run", "train", "eq-unet-d4-w4-isbi"),
                         ("publish", "eq-unet-d4-w4-isbi", "dp_eps8", True, pytest.approx((0.00707, 2), rel=1e-3))]
    card = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("unet-w4-horse", "unet-w4-isbi",
                                                                          "eq-unet-d4-w4-isbi")}
    assert card["unet-w4-horse"]["recipe"]["lr"] == 0.0625 and card["unet-w4-horse"]["recipe"]["resize"] == 128
    assert card["unet-w4-isbi"]["input_size"] == [3, 512, 512] and card["unet-w4-isbi"]["recipe"]["trainable"] == \
        "head+norm"
    assert card["eq-unet-d4-w4-isbi"]["input_size"] == [1, 512, 512]
