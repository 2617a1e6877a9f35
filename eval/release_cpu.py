"""The CPU release tier: train and publish zoo's private checkpoints on a 2-core CPU (issue 15). Resumable.

Stages (each skipped when its checkpoint is published; an interrupted run resumes from its checkpoints):
  backbone   ``wrn16-1`` trained *non-privately* on CIFAR-10 (epsilon = inf: clipping, no noise; B=256, 1,000
             steps = 256,000 samples), published as ``wrn16-1.nonprivate_cifar10``: CIFAR-10 is public data with
             respect to chest X-rays, so fine-tuning from it costs no privacy on the X-rays (its card says plainly
             that this checkpoint is not private).
  study      ``eval/study_pneumonia.py --config release``: wrn16-1-pneumonia from scratch vs fine-tuned from the
             backbone, epsilon 8 / 3 / 1, 3 public seeds each (measurements, not releases).
  pneumonia  for each epsilon, the start with the higher mean balanced accuracy in the study, trained once more
             with a secret seed through the ``zoo`` command line and published as ``wrn16-1-pneumonia.dp_epsE``
             (epsilon 8 the default), each result carrying the study's seed spread for ``zoo reproduce --retrain``.
  cifar10    ``wrn16-1`` at epsilon 8 (B=1024, 400 steps = 409,600 samples, K=1), secret seed, published as
             ``wrn16-1.dp_eps8`` (the default).
  cifar10-eq ``eq-resnet9-c4`` at epsilon 8 at the compute of ``wrn16-1.dp_eps8`` (the plain release above):
             the same idle CPU time, converted to samples by the two models' DP-loop throughput in
             ``eval/results/bench-train-loop/results.md`` (eq-resnet9-c4 70 samples/s, wrn16-1 199 on the path
             that trained its release): 409,600 x 70 / 199 = about 144,000 samples, run as B=512, S=280 (143,360;
             sigma 0.55). Otherwise the plain release's recipe (clip 1, lr 2, no momentum, K=1, EMA 0.999,
             physical batch 64). Secret seed, published as ``eq-resnet9-c4.dp_eps8`` (the default): the
             equivariant CIFAR-10 release and the equal-compute comparison of issue 15 in one run.
  cifar10-e2e-study  ``eval/study_cifar10.py --config release-e2e``: the two releases' recipes above at full
             privacy, public seeds 0, 1, 2 (about 40 and 28 idle minutes a seed); their spread goes into the cards'
             results (``zoo.publish.attach_spread``; the checkpoints are untouched).
  sparsity-study  ``eval/study_sparsity.py --config budget --datasets pneumoniamnist``: wrn16-1-pneumonia with
             and without L0 gates at epsilon 8, privacy from ``zoo.privacy.tan.propose`` alone (B=371, S=400, 148,400
             samples a run), public seeds.
  pneumonia-l0  ``wrn16-1-pneumonia-l0``: the study's smallest gated network within a point of the dense twin
             (gate scale 30, lambda 0.01), its card's
             recipe (which prunes at the end: the checkpoint is the plain pruned network), secret seed, published
             as ``wrn16-1-pneumonia-l0.dp_eps8`` (the default) with the dense twin's accuracy in its note.
  cifar10-study  ``eval/study_cifar10.py --config release``: TAN small-batch search at epsilon 8, then the best
             simulated recipe of each model at full privacy, 3 public seeds.
  scatternet ``scatternet-linear`` with the study's chosen full recipe, secret seed, published as
             ``scatternet-linear.dp_eps8`` (the default) with the study's seed spread.
  pneumonia-scatternet-study  ``eval/study_cifar10.py --config pneumonia-scatternet``: the same TAN procedure for
             ScatterNet + linear / + CNN on PneumoniaMNIST at epsilon 8, 3 and 1 (a few tens of seconds per run).
  pneumonia-scatternet  per epsilon, the better ScatterNet model of that study (mean balanced accuracy over its
             full-privacy seeds), secret seed, published as ``MODEL.dp_epsE`` (epsilon 8 the card's default).
  cifar10-long-search  ``eval/study_cifar10.py --config release-long --stage search``: ScatterNet + CNN at B=4096,
             S=360 (1,474,560 samples, about 30 epochs), lr 4 simulated at b=2048.
  scatternet-cnn  its better simulated recipe at full privacy, secret seed, published as
             ``scatternet-cnn.dp_eps8`` (the default); the study's full-privacy seeds come after it (``python
             eval/study_cifar10.py --config release-long --stage full``), as each takes most of a session.
  scatternet-cnn-datanorm  the same for ScatterNet + CNN with Tramèr & Boneh's private data normalisation
             (``zoo.dp.data_norm``; its statistics' release is in the ledger), with or without the EMA, whichever
             simulated better, published as ``scatternet-cnn-datanorm.dp_eps8`` (its card's default).
  scatternet-cnn-datanorm-eps3  ``eval/study_cifar10.py --config release-long-eps3 --stage search`` (the
             statistics' sigma 8 or 16 at B=8192, S=360), then the better simulated variant at epsilon 3, secret
             seed, published as ``scatternet-cnn-datanorm.dp_eps3``; once the study's full-privacy seeds exist
             (``--stage full``), the recipe with the best mean over them (sigma 8: 0.6854 +/- 0.0034 over 3 seeds),
             trained again if the published one differs in any recipe setting.
  segmentation-study  ``eval/study_segmentation.py --config budget``: every segmentation architecture at width
             4 (depth 3) with a TAN-chosen lr at one budget per data set (horses B=32 of 222, S=300, K=2 at
             128x128: 19,200 samples x 2 views; ISBI B=20 of 20, S=40, K=2 on 128x128 crops), epsilon inf / 8 / 3,
             3 public seeds for the cells that decide the ranking at epsilon 8.
  segmentation  per data set (horses, then ISBI 2012), the network with the best mean Dice over the study's seeds
             at epsilon 8, and the equivariant one too when within 0.02 Dice of it, under a card of its own
             written from the study (``unet-w4-horse``: the network, its data set), trained with a secret seed and
             published as ``NAME.dp_eps8`` with the study's seed spread. A network fine-tuned from public
             pretraining in the study starts from its noise-free checkpoint on horses, trained here with a secret
             seed and published under the network's horse card, e.g. ``unet-w4-horse.nonprivate_weizmann-horse``
             (not private, never a default; the release's ledger records it as pretraining).
A published release whose recipe has full-privacy seeds in its study gets their spread attached to its card results
(``zoo reproduce --retrain`` compares against it); a published release whose recipe differs in any setting from
the one its study now chooses is trained again and replaced.
Budgets are in samples processed; wall times are printed. Reproduce:  python eval/release_cpu.py [--stages ...]
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "release"
ZOO = [str(Path(sys.executable).with_name("zoo"))]
STUDY_CSV = ROOT / "eval" / "results" / "pneumonia-release" / "results.csv"
CIFAR_STUDY_CSV = ROOT / "eval" / "results" / "cifar10-release" / "results.csv"
BACKBONE = "wrn16-1.nonprivate_cifar10"
PNEUMONIA = {"batch-size": 256, "physical-batch-size": 128, "steps": 200, "augmult": 1, "lr": 2, "ema-decay": 0.99}
CIFAR = {"epsilon": 8, "batch-size": 1024, "physical-batch-size": 64, "steps": 400, "augmult": 1, "ema-decay": 0.999}
# the equivariant model at the plain release's compute (409,600 samples x 70 / 199 samples/s, the stage doc above)
EQ_CIFAR = {**CIFAR, "batch-size": 512, "steps": 280, "clip-norm": 1.0, "lr": 2.0, "momentum": 0.0}
METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def flags(d: dict) -> list[str]:
    return [w for k, v in d.items() for w in (f"--{k}", str(v))]


def published(full: str) -> bool:
    import zoo

    return full in zoo.list_models(pretrained=True)


def published_recipe(full: str) -> dict:
    """The training recipe recorded in the sidecar of the published checkpoint ``full`` (``NAME.TAG``)."""
    from zoo.catalog.checkpoint import paths
    from zoo.catalog.registry import resolve_checkpoint

    return json.loads(paths(resolve_checkpoint(full)[0])[1].read_text())["train_state"]["recipe"]


PROCS = 1
"""Processes per training run (``--procs``): above 1, each ``zoo train`` / ``zoo finetune`` runs under ``torchrun``
as that many one-thread processes that train the one model together (:mod:`zoo.dp.distributed`: the same batches,
clipping, noise and ledger as one process). Measured on the idle 2-core CPU (``eval/results/bench-train-loop``):
no gain for ScatterNet + CNN (1.00x), a loss for the WRNs and eq-resnet9-c4, so the releases keep 1."""


def run(cmd: list[str], out: Path) -> None:
    """Run a zoo training command into ``out`` (resuming what an interrupted call left), echoing its output; in
    ``PROCS`` processes of one thread each when ``PROCS`` > 1."""
    t0 = time.time()
    cmd = [*cmd, "--out", str(out), "--checkpoint-every", "25", "--no-progress"]
    env = None
    if PROCS > 1 and cmd[:1] == ZOO:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCS),
               "--no-python", *cmd]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if out.exists() and (out / "final.json").exists():
        print(f"  {out} is complete", flush=True)
        return
    if out.exists():
        cmd.append("--resume")
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def publish(out: Path, name: str, tag: str, default: bool, note: str = "", spread: dict | None = None) -> None:
    from zoo.catalog.cards import CARDS_DIR, load_card
    from zoo.catalog.registry import get_card
    from zoo.publish import publish as pub

    r = pub(out, name, tag, default=default, note=note, spread=spread)
    get_card(name).update(load_card(CARDS_DIR / f"{name}.json"))  # this process sees the new checkpoint too
    print(f"  published {name}.{tag}: {r['metrics']} ({r['dtype']['stored']}, weights/ {r['weights_mib']} MiB)",
          flush=True)


def study_rows(path: Path = STUDY_CSV) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


SPARSITY_CSV = ROOT / "eval" / "results" / "sparsity-budget" / "results.csv"
SPARSE_RELEASE = "wrn16-1-pneumonia-l0"


def sparsity_rows(name: str = SPARSE_RELEASE, path: Path = SPARSITY_CSV) -> tuple[list[dict], list[dict]]:
    """``(dense twin rows, rows of name's gated setting)`` of the sparsity study on PneumoniaMNIST (public seeds)."""
    import zoo

    args = zoo.model_info(name)["args"]
    rows = [r for r in study_rows(path) if r["config"] == "budget" and r["dataset"] == "pneumoniamnist"]
    dense = [r for r in rows if r["setting"] == "dense"]
    gated = [r for r in rows if r["l0"] == "1" and float(r["l0_lambda"]) == args["l0_lambda"]
             and float(r["gate_scale"]) == args.get("l0_gate_scale", 1.0)]
    if not dense or not gated:
        raise SystemExit(f"{path} has no dense twin or no row of {name}'s setting; run --stages sparsity-study first")
    return dense, gated


def dense_twin_note(name: str = SPARSE_RELEASE, path: Path = SPARSITY_CSV) -> str:
    """What the sparse release's card says beside its own numbers: the dense twin's accuracy (the same network
    without gates, the same recipe: equal epsilon and samples) and the gated recipe's, public seeds of the sparsity
    study, with the parameters the gated runs kept."""
    dense, gated = sparsity_rows(name, path)

    def acc(rs):
        v = [float(r["accuracy"]) for r in rs]
        return f"{statistics.fmean(v):.4f}" + (f" +/- {statistics.stdev(v):.4f}" if len(v) > 1 else "") + \
            f" ({len(v)} public seed{'s' if len(v) > 1 else ''})"
    kept = statistics.fmean(float(r["params_pruned"]) for r in gated)
    return (f"dense twin (wrn16-1-pneumonia without gates, the same recipe: equal epsilon and samples, "
            f"eval/results/sparsity-budget): accuracy {acc(dense)}; this gated recipe there: {acc(gated)}, "
            f"{kept:,.0f} of {int(dense[0]['params']):,} parameters kept")


def sparse_spread(name: str = SPARSE_RELEASE, path: Path = SPARSITY_CSV) -> dict | None:
    """The seed spread of the sparse release's recipe in the sparsity study (None below 2 seeds), for
    ``zoo reproduce --retrain``."""
    _, gated = sparsity_rows(name, path)
    if len(gated) < 2:
        return None
    source = f"eval/study_sparsity.py --config budget, setting {gated[0]['setting']}, {len(gated)} public seeds"
    return {m: (statistics.stdev(float(r[m]) for r in gated), len(gated), source)
            for m in ("accuracy", "balanced_accuracy", "roc_auc")}


SEG_CONFIG = "budget"
SEG_CSV = ROOT / "eval" / "results" / f"segmentation-{SEG_CONFIG}" / "results.csv"
SEG_SHORT = {"weizmann-horse": "horse", "isbi2012": "isbi"}
SEG_EPSILON = 8.0
SEG_EQ_WITHIN = 0.02
"""The equivariant network is released beside the best one when its mean Dice is within this of the best's."""


def segmentation_picks(rows: list[dict], dataset: str, epsilon: float = SEG_EPSILON,
                       within: float = SEG_EQ_WITHIN) -> list[dict]:
    """The segmentation releases of ``dataset``, from the budget study's full-privacy runs at ``epsilon`` that have
    2 or more seeds (the cells that decide the ranking): the variant (network, start, trainable, lr) with the
    highest mean Dice, then, unless it is equivariant itself, the best equivariant variant if within ``within`` of
    it (so no two picks share a network, nor the name of their card). Each pick:
    ``{model, model_args, start, trainable, lr, rows, mean, std, best}`` (``best``: the best variant's mean)."""
    groups: dict = {}
    for r in rows:
        if (r["config"], r["stage"], r["dataset"]) == (SEG_CONFIG, "full", dataset) and \
                float(r["epsilon"]) == epsilon:
            groups.setdefault((r["model"], r["start"], r["trainable"], float(r["lr"])), []).append(r)
    groups = {k: rs for k, rs in groups.items() if len(rs) >= 2}
    if not groups:
        raise SystemExit(f"the segmentation study has no {dataset} cell at epsilon {epsilon:g} with 2 or more seeds "
                         f"yet; run `python eval/study_segmentation.py --config {SEG_CONFIG}` first")
    mean = {k: statistics.fmean(float(r["dice"]) for r in rs) for k, rs in groups.items()}
    best = max(mean, key=mean.get)
    eq = [k for k in sorted(mean, key=mean.get, reverse=True) if k[0].startswith("eq-")]
    keys = [best] + ([eq[0]] if eq and not best[0].startswith("eq-") and mean[best] - mean[eq[0]] <= within else [])
    return [{"model": k[0], "model_args": ast.literal_eval(groups[k][0]["model_args"]), "start": k[1],
             "trainable": k[2], "lr": k[3], "rows": groups[k], "mean": mean[k],
             "std": statistics.stdev(float(r["dice"]) for r in groups[k]), "best": mean[best]} for k in keys]


def segmentation_name(model: str, model_args: dict, dataset: str) -> str:
    """The release's name: the study's network (``model`` at ``model_args``) and its data set, e.g. ``unet-w16`` at
    width 4 on horses -> ``unet-w4-horse`` (its card gives the depth)."""
    from zoo.catalog.registry import get_card

    width = get_card(model)["args"]["width"]
    if not model.endswith(f"-w{width}"):
        raise ValueError(f"{model!r} does not end in its width -w{width}; name its release by hand")
    return f"{model[:-len(str(width)) - 2]}-w{model_args['width']}-{SEG_SHORT[dataset]}"


def segmentation_recipe(dataset: str, lr: float, epsilon: float, trainable: str | None) -> dict:
    """The card recipe of a network of the budget study on ``dataset``: the study's recipe at the chosen ``lr``."""
    from study_segmentation import COMMON, CONFIGS as SEG_STUDIES, DATASETS  # eval/ is on the path of this script

    base = {**COMMON, **SEG_STUDIES[SEG_CONFIG]["recipes"][dataset], "lr": lr}
    recipe = {"dataset": dataset, "epsilon": epsilon, "delta": DATASETS[dataset]["delta"]}
    recipe.update({k: base[k] for k in ("accountant", "batch_size", "physical_batch_size", "steps", "clip_norm",
                                        "lr", "momentum", "augmult", "ema_decay", "crop", "resize")})
    if trainable not in (None, "all"):
        recipe["trainable"] = trainable
    return recipe


def segmentation_card(model: str, model_args: dict, dataset: str, recipe: dict, in_chans: int, source: str,
                      summary_tail: str) -> str:
    """Write ``models/NAME.json`` for the study's network ``model`` at ``model_args`` trained on ``dataset`` with
    ``recipe`` (``source`` says where it comes from), unless a card of that name exists with the same architecture
    and recipe; a card whose recipe differs is rewritten only while it has no checkpoint. Returns NAME."""
    import zoo
    from zoo.catalog.cards import CARDS_DIR, load_card
    from zoo.catalog.registry import count_params, get_card, register_model
    from zoo.data import get_dataset_info, preparation
    from zoo.io import write_text

    name = segmentation_name(model, model_args, dataset)
    base = get_card(model)
    args = {**base["args"], **model_args}
    recipe = {**recipe, "source": source}
    path = CARDS_DIR / f"{name}.json"
    if path.exists():
        have = load_card(path)
        same = have["args"] == args and {k: v for k, v in have["recipe"].items() if k != "source"} == \
            {k: v for k, v in recipe.items() if k != "source"}
        if same:
            return name
        if have["checkpoints"]:
            raise SystemExit(f"{path} has checkpoints and another architecture or recipe than the study now "
                             f"chooses ({args}, {recipe}); retire it by hand before releasing another")
    params = count_params(base, in_chans=in_chans, **model_args)  # as zoo.model_info counts them
    info = get_dataset_info(dataset)
    levels = f", depth {args['depth']}" if "depth" in args else ""
    card = {"name": name,
            "summary": f"{base['summary'].split(' (')[0]} at width {args['width']}{levels} ({params:,} parameters) "
                       f"for {info.name} ({' vs '.join(getattr(info, 'classes', ()) or ())}): {summary_tail}",
            "family": base["family"], "args": args,
            "input_size": preparation(info, recipe, in_chans)["input_size"], "num_classes": base["num_classes"],
            "recipe": recipe, "results": [], "checkpoints": [], "references": base.get("references", [])}
    write_text(path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    card = load_card(path)  # valid
    if name in zoo.list_models():  # rewritten (it had no checkpoint): this process sees the new card too
        get_card(name).update(card)
    else:
        register_model(card)
    print(f"  wrote {path}", flush=True)
    return name


def segmentation_release(dataset: str, epsilon: float = SEG_EPSILON) -> None:
    """Train and publish the segmentation releases of ``dataset`` at ``epsilon`` (:func:`segmentation_picks`): each
    pick's network under a card of its own (:func:`segmentation_card`), trained once more with a secret seed through
    the ``zoo`` command line, published as ``NAME.dp_epsE`` with the spread of the study's seeds. A pick fine-tuned
    from public pretraining starts from a published noise-free checkpoint of the same network on the public data set
    (trained here too, with a secret seed, tagged ``nonprivate_DATASET``: it gives no privacy guarantee for that
    data set, and the private checkpoint's ledger records it as its pretraining)."""
    from zoo.catalog.registry import NONPRIVATE_PREFIX

    from zoo.data import get_dataset_info

    from study_segmentation import SCRATCH, chosen_lrs, study_command  # eval/ is on the path of this script

    tag = f"dp_eps{epsilon:g}"
    rows = study_rows(SEG_CSV)
    picks = segmentation_picks(rows, dataset, epsilon)
    study = study_command(SEG_CONFIG)  # in every card's source: the study does not take its releases for architectures
    for pick in picks:
        model, margs, lr = pick["model"], pick["model_args"], pick["lr"]
        n = len(pick["rows"])
        how = (f"{'the best' if pick['mean'] == pick['best'] else 'the equivariant'} network of the segmentation "
               f"budget study ({study}) on {dataset} at epsilon {epsilon:g}: its lr chosen by TAN's small-batch "
               f"simulation, full-privacy seeds 0-{n - 1}: mean Dice {pick['mean']:.3f} +/- {pick['std']:.3f}"
               + ("" if pick["mean"] == pick["best"] else f" (the best network's {pick['best']:.3f})"))
        spread = {m: (statistics.stdev(float(r[m]) for r in pick["rows"]), n, f"{study}, {n} seeds")
                  for m in ("dice", "iou")}
        in_chans = get_dataset_info(dataset if pick["start"] == SCRATCH else pick["start"]).in_chans
        recipe = segmentation_recipe(dataset, lr, epsilon, pick["trainable"])
        name = segmentation_card(model, margs, dataset, recipe, in_chans, source=how,
                                 summary_tail=f"released at epsilon {epsilon:g}, {how}")
        if published(f"{name}.{tag}"):
            print(f"  {name}.{tag} is published", flush=True)
            continue
        out = RUNS / f"{dataset}-{name}-eps{epsilon:g}-lr{lr:g}"
        if pick["start"] == SCRATCH:
            run([*ZOO, "train", name], out)  # the card's recipe
        else:
            src_lr = chosen_lrs(rows, SEG_CONFIG).get((pick["start"], model, SCRATCH, "all"))  # as the study did
            if src_lr is None or not any(
                    (r["config"], r["stage"], r["dataset"], r["model"], r["start"]) == (SEG_CONFIG, "full",
                                                                                         pick["start"], model, SCRATCH)
                    and float(r["epsilon"]) == math.inf and float(r["lr"]) == src_lr for r in rows):
                raise SystemExit(f"the study has no noise-free {pick['start']} run of {model}, which {name} starts "
                                 f"from; run `python {study}` first")
            # the public network's card is its study recipe at epsilon 8 (the same card, whether or not it is
            # also released privately on that data set); its pretraining checkpoint is trained at epsilon inf
            src = segmentation_card(model, margs, pick["start"],
                                    segmentation_recipe(pick["start"], src_lr, epsilon, None),
                                    get_dataset_info(pick["start"]).in_chans,
                                    source=f"{study} on {pick['start']}: the lr chosen by TAN's small-batch "
                                           "simulation at epsilon 8",
                                    summary_tail=f"its noise-free checkpoint is the public pretraining of {name}")
            src_tag = f"{NONPRIVATE_PREFIX}_{pick['start']}"
            if not published(f"{src}.{src_tag}"):
                src_out = RUNS / f"{pick['start']}-{src}-epsinf-lr{src_lr:g}"
                run([*ZOO, "train", src, "--epsilon", "inf"], src_out)
                publish(src_out, src, src_tag, default=False,
                        note=f"NOT PRIVATE: trained without noise (epsilon = inf) on {pick['start']}, as public "
                             f"pretraining for {name}; it gives no privacy guarantee for {pick['start']}")
            # every setting of the recipe, so that none comes from the source's card (horses resize to 128; 0
            # unsets a crop or resize: zoo.runspec.UNSET_BY_ZERO)
            flags_ = {k.replace("_", "-"): 0 if v is None else v for k, v in recipe.items()
                      if k != "dataset" and (v is not None or k in ("crop", "resize"))}
            run([*ZOO, "finetune", f"{src}.{src_tag}", "--dataset", dataset, *flags(flags_)], out)
        publish(out, name, tag, default=True, spread=spread, note=how)


def tan_study_release(config: str, models: list[str], epsilon: float, default: bool,
                      before_full: bool = False) -> None:
    """Train the best of ``models`` at ``epsilon`` in the TAN study ``config`` of ``eval/study_cifar10.py`` (the
    full-privacy recipe with the highest mean ranking metric over its seeds) once more with a secret seed, and
    publish it as ``MODEL.dp_epsE`` with the spread of the study's full-privacy seeds.

    ``before_full``: where the study has no full-privacy recipe with 2 or more seeds yet, take the best simulated
    recipe of its search instead (TAN's own order: search, then one run at full privacy, which is this one), and
    publish without a seed spread (``zoo reproduce --retrain`` then compares within its fixed tolerance); the
    note says so. For budgets where a full run takes most of a session."""
    from study_cifar10 import CONFIGS as TAN_STUDIES, best_points  # eval/ is on the path of this script
    import zoo
    from zoo.catalog.registry import get_card
    from zoo.publish import NO_SPREAD_YET, attach_spread

    cfg = TAN_STUDIES[config]
    csv_path = ROOT / "eval" / "results" / f"{cfg['dataset']}-{config}" / "results.csv"
    metric = cfg["metric"]
    groups: dict = {}
    all_rows = study_rows(csv_path)
    for r in all_rows:
        if r["stage"] == "full" and r["model"] in models and float(r["epsilon_target"]) == epsilon:
            groups.setdefault((r["model"], r["batch_size"], r["steps"], r["lr"]), []).append(r)
    groups = {k: rs for k, rs in groups.items() if len(rs) >= 2}
    if groups:
        (model, b, s, lr), rows = max(groups.items(), key=lambda kv: statistics.fmean(float(r[metric]) for r in kv[1]))
        source = f"eval/study_cifar10.py --config {config}, stage full, {len(rows)} seeds"
        spread = {m: (statistics.stdev(float(r[m]) for r in rows), len(rows), source)
                  for m in METRICS if m in rows[0]}
        mean = statistics.fmean(float(r[metric]) for r in rows)
        chose = ("chosen by TAN's small-batch simulation in" if cfg["models"][model].get("search", True)
                 else "given (not searched) in")
        how = (f"recipe {chose} eval/study_cifar10.py --config {config}; "
               f"full-privacy seeds 0-{len(rows) - 1}: mean {metric.replace('_', ' ')} {mean:.4f}")
    elif before_full:
        chosen = {k: v for k, v in best_points(all_rows, config, metric).items() if k[0] in models and k[1] == epsilon}
        if not chosen:
            raise SystemExit(f"the study {config} has no search row of {models} at epsilon {epsilon:g}; run "
                             f"`python eval/study_cifar10.py --config {config} --stage search` first")
        sims = {k: statistics.fmean(float(r[metric]) for r in all_rows if r["stage"] == "search"  # as best_points
                                    and r["model"] == k[0]
                                    and (int(r["full_batch_size"]), int(r["steps"]), float(r["lr"])) == v)
                for k, v in chosen.items()}
        (model, _), (b, s, lr) = max(chosen.items(), key=lambda kv: sims[kv[0]])
        spread, mean = None, sims[model, epsilon]
        how = (f"recipe chosen by TAN's small-batch simulation in eval/study_cifar10.py --config {config} "
               f"(simulated {metric.replace('_', ' ')} {mean:.4f}); trained at full privacy before the study's "
               f"full-privacy seeds, {NO_SPREAD_YET}")
    else:
        raise SystemExit(f"the study {config} has no full-privacy recipe of {models} at epsilon {epsilon:g} with 2 "
                         f"or more seeds; run `python eval/study_cifar10.py --config {config}` first")
    b, s, lr = int(b), int(s), float(lr)  # CSV cells are strings
    tag = f"dp_eps{epsilon:g}"
    entry = cfg["models"][model]
    name = entry.get("model", model)  # a study entry may be a variant (its fixed settings) of a registered model
    if published(f"{name}.{tag}"):
        was = published_recipe(f"{name}.{tag}")
        # every setting the recipe fixes, not only B, S and lr: a variant may differ in one (e.g. norm_sigma)
        want = {**get_card(name)["recipe"], **entry["fixed"], "batch_size": b, "steps": s, "lr": lr}
        differ = {k: (was.get(k), v) for k, v in want.items() if k not in ("source", "epsilon") and was.get(k) != v}
        if not differ:
            have = [r for r in zoo.model_info(name)["results"] if r.get("checkpoint") == tag]
            if spread and any(r.get("seed_n") != spread[r["metric"]][1] for r in have if r["metric"] in spread):
                std, seeds = spread[metric][0], f"seeds 0-{len(rows) - 1} of this recipe"
                said = f"mean {metric.replace('_', ' ')} {mean:.4f} +/- {std:.4f}"
                n = attach_spread(name, tag, spread, note=f"which followed: {seeds} score {said}"
                                  if any(NO_SPREAD_YET in r.get("note", "") for r in have)
                                  else f"the study's full-privacy {seeds}, run after this release: {said}")
                print(f"{name}.{tag}: the seed spread of its recipe attached to {n} card results", flush=True)
            return
        print(f"{name}.{tag} was trained with " + ", ".join(f"{k}={a}" for k, (a, _) in differ.items())
              + "; the study now chooses " + ", ".join(f"{k}={v}" for k, (_, v) in differ.items())
              + ": training it, to replace the published checkpoint (the old one stays in git history)", flush=True)
    recipe = {"dataset": cfg["dataset"], "epsilon": f"{epsilon:g}", "delta": f"{cfg['delta']:g}",
              "batch-size": b, "steps": s, "lr": lr, **{k.replace("_", "-"): v for k, v in entry["fixed"].items()}}
    print(f"{config}, epsilon {epsilon:g}: {model}, B={b}, S={s}, lr={lr} ({how})", flush=True)
    out = RUNS / f"{cfg['dataset']}-{model}-eps{epsilon:g}-B{b}-S{s}-lr{lr:g}"
    run([*ZOO, "train", name, *flags(recipe)], out)
    publish(out, name, tag, default=default, spread=spread, note=how)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+",
                    default=["backbone", "study", "pneumonia", "cifar10", "cifar10-eq", "cifar10-e2e-study",
                             "sparsity-study", "pneumonia-l0", "cifar10-study", "scatternet",
                             "pneumonia-scatternet-study", "pneumonia-scatternet", "cifar10-long-search",
                             "scatternet-cnn", "scatternet-cnn-datanorm", "scatternet-cnn-datanorm-eps3",
                             "segmentation-study", "segmentation"])
    ap.add_argument("--procs", type=int, default=1,
                    help="one-thread processes per training run, under torchrun (eval/bench_train_loop.py --procs "
                         "measures the gain); default 1: one process on every thread")
    args = ap.parse_args()
    global PROCS
    PROCS = args.procs
    os.environ.setdefault("ZOO_DATA", str(ROOT.parent / "shared" / "data"))
    RUNS.mkdir(parents=True, exist_ok=True)
    if "backbone" in args.stages and not published(BACKBONE):
        out = RUNS / "public-wrn16-1-cifar10"
        run([*ZOO, "train", "wrn16-1", "--epsilon", "inf", "--batch-size", "256", "--physical-batch-size", "256",
             "--steps", "1000", "--augmult", "1", "--ema-decay", "0.999"], out)
        publish(out, "wrn16-1", "nonprivate_cifar10", default=False,
                note="NOT PRIVATE: trained without noise (epsilon = inf) on CIFAR-10, as public pretraining for "
                     "other data sets (e.g. chest X-rays); it gives no privacy guarantee for CIFAR-10")
    if "study" in args.stages:
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_pneumonia.py"), "--config", "release"], check=True)
    if "pneumonia" in args.stages:
        rows = [r for r in study_rows() if r["config"] == "release"]
        for eps in (8, 3, 1):
            tag = f"dp_eps{eps}"
            if published(f"wrn16-1-pneumonia.{tag}"):
                continue
            by_start = {s: [r for r in rows if r["start"] == s and float(r["epsilon"]) == eps]
                        for s in ("scratch", "public")}
            mean = {s: statistics.fmean(float(r["balanced_accuracy"]) for r in rs) for s, rs in by_start.items() if rs}
            start = max(mean, key=mean.get)
            chosen = by_start[start]
            spread = {m: (statistics.stdev(float(r[m]) for r in chosen), len(chosen),
                          f"eval/study_pneumonia.py --config release, start {start}, {len(chosen)} seeds")
                      for m in METRICS}
            print(f"epsilon {eps}: {start} (mean balanced accuracy {mean})", flush=True)
            out = RUNS / f"pneumonia-{start}-eps{eps}"
            if start == "scratch":
                cmd = [*ZOO, "train", "wrn16-1-pneumonia", "--epsilon", str(eps), *flags(PNEUMONIA)]
            else:
                cmd = [*ZOO, "finetune", BACKBONE, "--dataset", "pneumoniamnist", "--epsilon", str(eps),
                       "--delta", "1e-4", *flags(PNEUMONIA)]
            run(cmd, out)
            publish(out, "wrn16-1-pneumonia", tag, default=eps == 8, spread=spread,
                    note=f"the study's better start at this epsilon: {start} (mean balanced accuracy over 3 seeds "
                         + ", ".join(f"{s} {v:.3f}" for s, v in mean.items()) + ")")
    if "cifar10" in args.stages and not published("wrn16-1.dp_eps8"):
        out = RUNS / "cifar10-wrn16-1-eps8"
        run([*ZOO, "train", "wrn16-1", *flags(CIFAR)], out)
        publish(out, "wrn16-1", "dp_eps8", default=True)
    if "cifar10-eq" in args.stages and not published("eq-resnet9-c4.dp_eps8"):
        out = RUNS / "cifar10-eq-resnet9-c4-eps8"
        run([*ZOO, "train", "eq-resnet9-c4", *flags(EQ_CIFAR)], out)
        publish(out, "eq-resnet9-c4", "dp_eps8", default=True,
                note="equal compute with wrn16-1.dp_eps8 (the same idle CPU time at the two models' measured DP-loop "
                     f"throughput, eval/results/bench-train-loop): {EQ_CIFAR['batch-size'] * EQ_CIFAR['steps']:,} "
                     f"samples against its {CIFAR['batch-size'] * CIFAR['steps']:,}")
    if "cifar10-e2e-study" in args.stages:  # the seed spread of the two end-to-end releases' recipes
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_cifar10.py"), "--config", "release-e2e"],
                       check=True)
        for model in ("wrn16-1", "eq-resnet9-c4"):
            tan_study_release("release-e2e", [model], 8.0, default=True)
    if "sparsity-study" in args.stages:
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_sparsity.py"), "--config", "budget", "--datasets",
                        "pneumoniamnist"], check=True)
    if "pneumonia-l0" in args.stages and not published(f"{SPARSE_RELEASE}.dp_eps8"):
        out = RUNS / "pneumonia-wrn16-1-l0-eps8"
        run([*ZOO, "train", SPARSE_RELEASE], out)  # the card's recipe, which prunes at the end
        publish(out, SPARSE_RELEASE, "dp_eps8", default=True, note=dense_twin_note(), spread=sparse_spread())
    if "cifar10-study" in args.stages:
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_cifar10.py"), "--config", "release"], check=True)
    if "scatternet" in args.stages:
        tan_study_release("release", ["scatternet-linear"], 8.0, default=True)
    if "pneumonia-scatternet-study" in args.stages:
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_cifar10.py"), "--config", "pneumonia-scatternet"],
                       check=True)
    if "pneumonia-scatternet" in args.stages:
        for eps in (8.0, 3.0, 1.0):
            tan_study_release("pneumonia-scatternet", ["scatternet-linear-pneumonia", "scatternet-cnn-pneumonia"],
                              eps, default=eps == 8)
    if "cifar10-long-search" in args.stages:
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_cifar10.py"), "--config", "release-long",
                        "--stage", "search"], check=True)
    if "scatternet-cnn" in args.stages:
        tan_study_release("release-long", ["scatternet-cnn"], 8.0, default=True, before_full=True)
    if "scatternet-cnn-datanorm" in args.stages:
        tan_study_release("release-long", ["scatternet-cnn-datanorm", "scatternet-cnn-datanorm+ema0.99"], 8.0,
                          default=True, before_full=True)
    if "scatternet-cnn-datanorm-eps3" in args.stages:
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_cifar10.py"), "--config", "release-long-eps3",
                        "--stage", "search"], check=True)
        tan_study_release("release-long-eps3", ["scatternet-cnn-datanorm", "scatternet-cnn-datanorm+nsigma16"], 3.0,
                          default=False, before_full=True)
    if "segmentation-study" in args.stages:
        subprocess.run([sys.executable, str(ROOT / "eval" / "study_segmentation.py"), "--config", SEG_CONFIG],
                       check=True)
    if "segmentation" in args.stages:
        for dataset in SEG_SHORT:  # horses first: an ISBI release may start from a horse network
            segmentation_release(dataset)
    if shutil.which("git"):
        subprocess.run([*ZOO, "card"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
