"""The DP-SGD engine: private training and fine-tuning with a ledger that travels with every checkpoint.

One DP-SGD step (what the guarantee in :mod:`zoo.privacy` assumes; :class:`zoo.dp.step.DPStep` is its one
implementation, which the audit and the step benchmark call too):
  1. Poisson sampling: each training sample joins the logical batch independently with probability
     ``q = batch_size / N`` (the batch size varies; it may be empty).
  2. The logical batch is processed in micro-batches of ``physical_batch_size`` samples (memory only: the
     result does not depend on it). Each sample is expanded to ``augmult`` augmented views; its gradient is
     the mean over its views (augmentation multiplicity), computed exactly per sample.
  3. Each sample's whole gradient is clipped to L2 norm ``clip_norm``; the clipped gradients are summed.
     With ``align`` set (gradient self-alignment, :mod:`zoo.dp.alignment`), the gradient is that of each
     sample's self-aligned loss, whose extra term reads only that sample and the public earlier updates.
  4. Gaussian noise N(0, (sigma * clip_norm)^2) is added once per step, and the sum is divided by the
     *expected* batch size ``q * N`` (a public constant); the gradient of any data-free penalty (the expected
     L0 of sparse models, :mod:`zoo.nn.sparse`) is added, then the optimizer steps. An EMA of the weights is
     kept for evaluation (post-processing: free).
A model that standardises its input with training-set statistics (:class:`zoo.nn.layers.DataStandardize`) has them
fitted once, privately, before step 1 (:mod:`zoo.dp.data_norm`: the Gaussian mechanism, recorded in the ledger and
composed with the steps). sigma is calibrated for the q and step count that training really uses; training stops before the ledger
would exceed the target epsilon. ``epsilon=inf`` is the noise-free reference: sigma = 0 with the same clipping,
sampling and schedule (so only the noise differs), and the ledger says epsilon = inf.
What is predicted, the loss per sample, the augmentation and the metrics come from the data set's task
(:mod:`zoo.data.tasks`: classification or segmentation); the model must be built for the same task.
Randomness (sampling, augmentation, noise) is drawn from generators seeded per step from ``seed``; the guarantee assumes that seed stays secret (by default it is drawn from the OS and
never published: the released ``final`` checkpoint omits it).
"""
from __future__ import annotations

import contextlib
import json
import math
import secrets
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from zoo.catalog import checkpoint as ckpt
from zoo.catalog.cards import RECIPE_SCHEMA, check_recipe_values, pruned_card
from zoo.catalog.registry import build, get_card, load_verified
from zoo.data import get_dataset_info, preparation
from zoo.data.folder import describe as describe_path_data
from zoo.data.tasks import task_of
from zoo.dp import distributed
from zoo.dp.accounting import BudgetExhaustedError, Ledger, calibrate_sigma, compute_epsilon
from zoo.dp.alignment import REFERENCE_SLOT, AlignedPerSampleGradients, AlignSettings, update_reference
from zoo.dp.data_norm import fit_private_statistics, needs_fitting, releases, statistics_history, statistics_layers
from zoo.dp.grad_sample import PerSampleGradients
from zoo.dp.step import DPStep, step_generator
from zoo.io import write_text
from zoo.models._base import set_trainable
from zoo.nn.equivariant import export
from zoo.nn.layers import MEMO_BYTES, memoized_fixed_layers
from zoo.nn.sparse import gate_modules, optimizer_groups, prune
from zoo.schedule import lr_factor


def ema_with_warmup(decay: float):
    """``multi_avg_fn`` for torch's ``AveragedModel``: EMA whose decay ramps up as
    ``min(decay, (1 + t) / (10 + t))`` after t updates (as TensorFlow's ExponentialMovingAverage with
    ``num_updates``), so that a short run is not dominated by the initial weights."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {decay}")

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        t = float(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1.0 + t) / (10.0 + t)))

    return update


def _with_views(batch, k: int, generator: torch.Generator, device: torch.device, info, recipe: dict):
    """``(x, y)`` on ``device``, each sample as ``k`` consecutive augmented views (the task's ``views``)."""
    return task_of(info).views(batch[0].to(device), batch[1].to(device), k, generator, info, recipe)


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int | None = None, device: str | torch.device = "cpu",
             progress: bool = False) -> dict[str, float]:
    """The metrics of the data set's task (:mod:`zoo.data.tasks`): accuracy and mean cross-entropy for
    classification; Dice and IoU per class (and their mean over the foreground classes) for segmentation.
    Computed with ``zoo.export(model)``: eval mode, equivariant layers expanded once into plain torch layers
    (same outputs to float rounding; ``model`` itself is left as it is)."""
    task = task_of(data.info)
    if task_of(model) is not task:
        raise ValueError(f"a {task_of(model).name} model cannot be evaluated on {data.info.name} ({task.name})")
    size = batch_size or (500 if task.name == "classification" else 4)
    return task.evaluate(export(model), data, size, device, progress)


def _resolve_seed(seed: int | None) -> tuple[int, str]:
    """Seed torch's global RNG (model init) and return ``(seed, how it was chosen)``; the same on every rank of a
    multi-process run (:func:`zoo.dp.distributed.shared_seed`)."""
    source = ("user-given seed (reproducible; the guarantee assumes it stays secret)" if seed is not None
              else "secret seed drawn from the OS")
    seed = distributed.shared_seed(seed)
    if seed is None:
        seed = secrets.randbits(62)
    torch.manual_seed(seed)
    return seed, source


def _resolve_device(device: str | None) -> torch.device:
    """``device``, by default CUDA when available; in a multi-process run each rank's own GPU."""
    return distributed.local_device(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


def _say(*args) -> None:
    """Print on the main process only (rank 0 of a multi-process run)."""
    if distributed.is_main():
        print(*args)


def _recipe(card: dict, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(RECIPE_SCHEMA))
    if unknown:
        raise ValueError(f"unknown recipe setting(s) {unknown}; known: {sorted(RECIPE_SCHEMA)}")
    optional = {k for k, (typ, _) in RECIPE_SCHEMA.items() if isinstance(typ, tuple) and type(None) in typ}
    recipe = {**dict.fromkeys(optional), **card["recipe"],
              **{k: v for k, v in overrides.items() if v is not None or k in optional}}  # None unsets those
    if isinstance(recipe.get("norm_clip"), tuple):
        recipe["norm_clip"] = list(recipe["norm_clip"])  # as JSON stores it (compared on resume)
    AlignSettings.from_recipe(recipe)  # refuse bad alignment settings before any data is loaded
    check_recipe_values(recipe, "recipe", "change that setting")  # the ranges a card's recipe is held to
    return recipe


def load_split(dataset: str, split: str, recipe: dict, data_dir=None, download: bool = False,
               subset: int | None = None, in_chans: int | None = None):
    """``split`` of ``dataset`` as a run with ``recipe`` sees it: resized to ``recipe["resize"]`` when set
    (segmentation at a lower resolution; X-rays to the size an equivariant model takes exactly), then the public, fixed (seed 0) subset of
    ``subset`` samples when given; grayscale images are repeated to a model's ``in_chans`` (a model pretrained on
    RGB fine-tuned on X-rays, :meth:`zoo.data.ArrayDataset.with_channels`)."""
    data = get_dataset_info(dataset).load(split, data_dir=data_dir, download=download)
    if recipe.get("resize"):
        data = data.resized(int(recipe["resize"]))
    if subset and int(subset) > len(data):
        what, every = (("--train-subset (the recipe's train_subset)", "--train-subset 0") if split == "train"
                       else ("--test-subset", "no --test-subset"))
        raise ValueError(f"{what} is {subset} but {dataset} has {len(data)} {split} images; pass at most "
                         f"{len(data)}, or {every} for all of them")
    data = data.subset(int(subset), seed=0) if subset else data
    return data.with_channels(in_chans) if in_chans else data


def _load_data(recipe: dict, data_dir, test_subset: int | None, download: bool, in_chans: int | None = None):
    load = lambda split, subset: load_split(recipe["dataset"], split, recipe, data_dir, download, subset,  # noqa: E731
                                            in_chans)
    return get_dataset_info(recipe["dataset"]), load("train", recipe.get("train_subset")), load("test", test_subset)


def _same_content(manifest: dict | None, info) -> bool:
    """Whether a ledger's data manifest describes the content of ``info`` (data given by path)."""
    return bool(manifest) and manifest.get("sha256") == getattr(info, "manifest", {}).get("sha256")


def _check_sizes(model: nn.Module, recipe: dict, train, test) -> None:
    """Refuse, before any step, training crops or test images the model cannot take (not after training)."""
    crop, m = recipe.get("crop"), getattr(model, "size_multiple", 1)
    size = min(train.images.shape[-2:])
    if crop is not None and crop > size:
        raise ValueError(f"crop {crop} is larger than the {size}x{size} training images of {train.info.name} "
                         f"(after resize={recipe.get('resize')}); use a smaller crop or a larger resize")
    sizes = {"training crop" if crop else "training image size": crop or train.images.shape[-1],
             "test image height": test.images.shape[-2], "test image width": test.images.shape[-1]}
    for what, s in sizes.items():
        if s % m:
            raise ValueError(f"{type(model).__name__} needs sizes divisible by {m}, but the {what} is {s}; "
                             f"pick a crop/resize that is a multiple of {m}")


def _latest_checkpoint(out_dir: Path) -> Path | None:
    """Newest ``step-*.safetensors`` in ``out_dir`` that verifies (a half-written one is skipped)."""
    for path in sorted(out_dir.glob("step-*.safetensors"), reverse=True):
        try:
            ckpt.read_checkpoint(path)
            return path
        except (ckpt.CheckpointIntegrityError, FileNotFoundError) as e:
            _say(f"skipping unusable checkpoint {path.name}: {e}")
    return None


def _remove_uncommitted(out_dir: Path) -> None:
    """Delete what a crash left of a checkpoint write that never committed: temporary files (``.NAME.*.tmp``,
    never renamed into place, :func:`zoo.io.atomic_write`) and step weights without their sidecar (the sidecar,
    written last, commits a checkpoint: :func:`zoo.catalog.checkpoint.save_checkpoint`). No committed checkpoint is
    touched."""
    if not distributed.is_main():
        return
    stale = [*out_dir.glob(".*.tmp"),
             *(p for p in out_dir.glob("step-*.safetensors") if not p.with_suffix(".json").exists())]
    for path in stale:
        _say(f"removing {path.name}, left by an interrupted checkpoint write")
        path.unlink(missing_ok=True)


def _rotate(out_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints; remove the others, sidecar first, so that an interruption leaves
    at worst a weights file without a sidecar, which no load accepts (:func:`_latest_checkpoint` skips it)."""
    steps = sorted({p.with_suffix("") for p in [*out_dir.glob("step-*.safetensors"), *out_dir.glob("step-*.json")]})
    for old in steps[:-keep]:
        old.with_suffix(".json").unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)


class RunFolderError(ValueError):
    """A run folder holds another run's files (a fresh run would mix with them), a resumed run was asked for
    settings other than its own, or the run to resume is already complete."""


_RUN_FILES = ("step-*.safetensors", "step-*.json", "final.safetensors", "final.json", "result.json")


def run_files(out_dir: str | Path) -> list[str]:
    """Names of the files in ``out_dir`` that belong to a training run (checkpoints, ``final``, ``result.json``)."""
    out = Path(out_dir)
    return sorted({p.name for pattern in _RUN_FILES for p in out.glob(pattern)}) if out.is_dir() else []


def _refuse_mixing(out: Path) -> None:
    """A fresh run must not write into a folder that holds another run: its ``final`` would replace that run's,
    and that run's step checkpoints would stay beside it (a later ``resume`` would pick them up)."""
    files = run_files(out)
    if files:
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise RunFolderError(
            f"{out} already holds a training run ({shown}); a new run there would mix with it. Continue that run "
            f"with --resume (resume=True), or train into another folder (--out / out_dir), or remove {out} first")


def _resume_differences(sidecar: dict, requested: dict) -> list[str]:
    """The settings in ``requested`` (what the caller asked for explicitly: recipe values, ``seed``, ``model``,
    ``model_args``, ``init``, ``test_subset``) that differ from those of the run being resumed, in words."""
    state = sidecar["train_state"]
    stored = {**state["recipe"], "seed": state.get("seed"), "model": sidecar["model"],
              "init": state.get("init"), "test_subset": state.get("test_subset")}
    diffs = []
    for key, want in requested.items():
        if key == "model_args":
            for arg, value in (want or {}).items():
                if sidecar["args"].get(arg) != value:
                    diffs.append(f"model argument {arg}: the run has {sidecar['args'].get(arg)!r}, asked {value!r}")
        elif want is not None and stored.get(key) != want:
            diffs.append(f"{key}: the run has {stored.get(key)!r}, asked {want!r}")
    return diffs


def pretraining_record(parent: dict | None, init: dict, dataset: str) -> dict:
    """The ledger's account of what a fine-tuned model started from: the other data set, whether that training was
    private (its epsilon) or not (public data with respect to ``dataset``: no guarantee is claimed for it, and
    none is needed if it holds no record of ``dataset``'s people), and the starting checkpoint's sha256."""
    eps = None if parent is None else parent.get("epsilon")
    private = eps is not None and math.isfinite(eps)
    return {"dataset": None if parent is None else parent.get("dataset"), "private": private, "epsilon": eps,
            "checkpoint_sha256": init.get("checkpoint_sha256"), "model": init.get("model"),
            "note": (f"trained privately on another data set (epsilon {eps:.3g} there); that guarantee does not "
                     f"compose with this one" if private else
                     f"not private: used as public data with respect to {dataset}")}


def _fit_statistics(model: nn.Module, train, recipe: dict, seed: int, device: torch.device, model_name: str,
                    ledger: Ledger, progress: bool = False) -> list:
    """Fit the model's :class:`zoo.nn.layers.DataStandardize` layers on ``train`` with the recipe's ``norm_sigma``
    and ``norm_clip`` (:func:`zoo.dp.data_norm.fit_private_statistics`; exact statistics for the noise-free
    reference, epsilon = inf); the noise comes from the run's seeded stream ``statistics``. Returns the ledger
    entries."""
    if recipe.get("norm_sigma") is None or recipe.get("norm_clip") is None:
        raise ValueError(f"{model_name} standardises its input with statistics of the training data "
                         "(zoo.nn.layers.DataStandardize), released privately before training: the recipe must give "
                         "norm_sigma (the noise multiplier of that release, e.g. 8) and norm_clip ([c_mean, c_square] "
                         "per channel group: the L2 clips of each sample's per-channel mean and mean of squares); see "
                         "zoo.dp.data_norm")
    sigma = 0.0 if math.isinf(recipe["epsilon"]) else float(recipe["norm_sigma"])
    if sigma:  # refuse before the pass over the data if the release alone would spend the budget
        cost = compute_epsilon([*ledger.accounted, *statistics_history(sigma, releases(model))], ledger.delta,
                               ledger.accountant)
        if cost >= ledger.target_epsilon:
            raise BudgetExhaustedError(
                f"releasing the normalisation statistics of {model_name} ({releases(model)} Gaussian releases at "
                f"norm_sigma {sigma:g}) would spend epsilon {cost:.3f} of the target {ledger.target_epsilon:g} before "
                "any DP-SGD step; raise norm_sigma (e.g. to 20), raise the target epsilon, or pick a model with "
                "GroupNorm (e.g. scatternet-cnn)")
    _say(f"fitting the normalisation statistics of {model_name} on the {len(train)} training samples (Gaussian "
         f"mechanism, sigma {sigma:g}, clips {recipe['norm_clip']})")
    model.to(device)
    with memoized_fixed_layers(MEMO_BYTES if recipe["augmult"] == 1 else 0):
        return fit_private_statistics(model, train, sigma=sigma, clip=recipe["norm_clip"], device=device,
                                      generator=step_generator(seed, 0, "statistics", device), progress=progress)


def _fixed_layer_memo(model: nn.Module):
    """The memo of fixed front ends (:func:`zoo.nn.layers.memoized_fixed_layers`) over a whole run of a model whose
    statistics are fitted first, so that the fit's pass and the training loop compute each image's scattering
    once; otherwise nothing (the loop opens its own)."""
    return memoized_fixed_layers(MEMO_BYTES) if needs_fitting(model) else contextlib.nullcontext()


class _Data(NamedTuple):
    info: Any
    task: Any
    train: Any
    test: Any
    prep: dict


def _open_folder(out: Path | None, resume: bool) -> Path | None:
    """Stage 1, the run folder. A fresh run refuses a folder with another run's files (:class:`RunFolderError`).
    ``resume`` drops uncommitted files and returns the newest committed step checkpoint; a complete run, or run
    files without a checkpoint that verifies, are refused; an empty or missing folder starts a new run (None)."""
    if out is not None and not resume and distributed.is_main():
        _refuse_mixing(out)
    if not resume or out is None:
        return None
    if out.exists():
        _remove_uncommitted(out)
        distributed.barrier()  # every rank then picks the same newest committed checkpoint
        newest = _latest_checkpoint(out)
        if newest is not None:
            return newest
    if (out / "final.json").exists():
        raise RunFolderError(f"the run in {out} is complete (final checkpoint {out / 'final.safetensors'}, result "
                             f"{out / 'result.json'}); there is nothing to resume. Train a new run into another "
                             "folder")
    left = run_files(out)
    if left:
        raise RunFolderError(f"{out} holds run files ({', '.join(left)}) but no step checkpoint that verifies; "
                             "nothing can be resumed. Move them away or train into another folder")
    _say(f"nothing to resume in {out}: starting a new run there")
    return None


def _restore(path: Path, out: Path, requested: dict) -> tuple[dict, dict, dict, nn.Module, Ledger]:
    """Stage 2, resuming: ``(train_state, tensors, card, model, ledger)`` of the step checkpoint ``path``. Refuses
    a complete run, ``requested`` settings that differ from the run's own (naming each), and a ledger whose step
    count disagrees with the run's."""
    tensors, sidecar = ckpt.read_checkpoint(path)
    state = sidecar["train_state"]
    if int(state["step"]) >= int(state.get("planned_steps", state["recipe"]["steps"])) \
            and (out / "final.json").exists():
        raise RunFolderError(f"the run in {out} is complete (step {state['step']} of "
                             f"{state.get('planned_steps')}; final checkpoint {out / 'final.safetensors'}); "
                             "there is nothing to resume")
    diffs = _resume_differences(sidecar, requested)
    if diffs:
        raise RunFolderError(f"--resume continues the run in {out} with its own settings, but this call asks "
                             f"for others: {'; '.join(diffs)}. Resume without those settings (or with the "
                             "run's values), or start a new run in another folder")
    card = sidecar["card"]  # the run's own architecture arguments, not the ones of this call's defaults
    ledger = Ledger.from_dict(sidecar["ledger"])
    if "ledger_steps_before" in state and ledger.steps != state["ledger_steps_before"] + state["step"]:
        raise ckpt.CheckpointIntegrityError(
            f"{path} is inconsistent: its ledger counts {ledger.steps} steps but the run was at step "
            f"{state['step']} after {state['ledger_steps_before']} inherited ones; do not resume from it")
    _say(f"resuming from {path} (step {state['step']}, epsilon {ledger.epsilon():.3f})")
    return state, tensors, card, build(card, **sidecar["args"]), ledger


def _prepare_data(model: nn.Module, model_name: str, card: dict, recipe: dict, ledger: Ledger | None, data_dir,
                  test_subset: int | None, download: bool) -> _Data:
    """Stage 3, the data: the recipe's data set loaded for ``model``. Refuses a model of another task, recipe
    settings the task does not read, other content under a ledger's data set, sizes the model cannot take and a
    head with another class count. Data given by path is resized to a classifier's input size unless the recipe
    says otherwise (recorded in ``recipe``)."""
    info = get_dataset_info(recipe["dataset"])
    task = task_of(info)
    if task_of(model) is not task:
        raise ValueError(f"{model_name} is a {task_of(model).name} model but {info.name} is a "
                         f"{task.name} data set; pick a model of that task (zoo.list_models())")
    unused = [k for k in ("crop", "resize") if recipe.get(k) is not None and k not in task.recipe_keys]
    if unused:
        raise ValueError(f"recipe setting(s) {unused} do not apply to {task.name} ({info.name}); remove them")
    if hasattr(info, "manifest"):  # data given by path (zoo.data.folder)
        _say(describe_path_data(info))
        size = card["input_size"][1:]  # a classifier's input size; a segmenter takes any multiple of its own
        if info.task == "classification" and recipe.get("resize") is None and list(info.image_size[1:]) != \
                list(size) and size[0] == size[1]:
            recipe["resize"] = int(size[0])
            _say(f"resizing the {info.image_size[1]}x{info.image_size[2]} images to the model's input size "
                 f"{size[0]}x{size[1]} (bilinear, antialiased; recorded in the checkpoint's preparation); pass "
                 "--resize to choose another size")
        if ledger is not None:  # resuming, or composing a budget on the same data: it must be the same content
            info.check_same(ledger.manifest, f"the ledger of this run (dataset {ledger.dataset})")
    info, train, test = _load_data(recipe, data_dir, test_subset, download, model.in_chans)
    if model.in_chans != info.in_chans:
        how = ("converting them to gray (ITU-R BT.601 luma) for the model's 1 input channel" if model.in_chans == 1
               else f"repeating them to the model's {model.in_chans} input channels")
        _say(f"{info.name} has {info.in_chans}-channel images: {how}")
    _check_sizes(model, recipe, train, test)
    prep = preparation(info, recipe, model.in_chans)
    if model.num_classes != info.num_classes:
        raise ValueError(f"model has {model.num_classes} classes but {info.name} has {info.num_classes}; "
                         f"create it with num_classes={info.num_classes} or fine-tune with zoo.finetune")
    return _Data(info, task, train, test, prep)


def _open_ledger(ledger: Ledger | None, info, n: int, recipe: dict, parent: dict | None, init: dict | None,
                 recipe_choice: dict | None) -> Ledger:
    """Stage 4, the ledger: a new one for the recipe's budget on ``info`` (with the parent's ledger when
    fine-tuning, and the record of the recipe's choice), or the given one, which must count the same ``n``."""
    if ledger is None:
        ledger = Ledger(dataset=info.name, num_samples=n, delta=recipe["delta"], accountant=recipe["accountant"],
                        clip_norm=recipe["clip_norm"], target_epsilon=recipe["epsilon"], parent=parent,
                        pretraining=pretraining_record(parent, init, info.name) if init else None,
                        augmult=recipe["augmult"], manifest=getattr(info, "manifest", None),
                        recipe_choice=recipe_choice)
    if ledger.num_samples != n:
        raise ValueError(f"the ledger is for N={ledger.num_samples} samples of {ledger.dataset}, this run has {n}")
    return ledger


def _release_statistics(model: nn.Module, model_name: str, train, recipe: dict, ledger: Ledger, *, fresh: bool,
                        seed: int, device: torch.device, init: dict | None, parent: dict | None,
                        progress: bool) -> None:
    """Stage 5, before step 1 of a fresh run: the model's data statistics are released (:func:`_fit_statistics`)
    and recorded in ``ledger``. A fine-tuned model keeps its checkpoint's statistics; ``norm_sigma`` on a model
    without such statistics is refused."""
    if fresh and needs_fitting(model):
        ledger.statistics.extend(_fit_statistics(model, train, recipe, seed, device, model_name, ledger, progress))
    elif recipe.get("norm_sigma") is not None and not statistics_layers(model):
        raise ValueError(f"recipe settings norm_sigma / norm_clip apply to models that standardise with private data "
                         f"statistics (zoo.nn.layers.DataStandardize); {model_name} has none: remove them")
    elif fresh and statistics_layers(model) and init is not None:
        _say(f"{model_name} keeps the normalisation statistics of the checkpoint it starts from (fitted on "
             f"{(parent or {}).get('dataset') or ledger.dataset}); they are not fitted again on {ledger.dataset}")


def _plan(recipe: dict, ledger: Ledger, state: dict, q: float) -> tuple[float, int, int]:
    """Stage 6, the noise and the steps: ``(sigma, planned, todo)``. sigma is the run's own when resuming, 0 for the
    noise-free reference, else calibrated for ``q``, the recipe's steps and the ledger's history; ``todo`` is the
    steps left that the budget allows (refused when none is)."""
    done = int(state.get("step", 0))
    if "sigma" in state:
        sigma = state["sigma"]
    elif math.isinf(recipe["epsilon"]):
        sigma = 0.0  # the noise-free reference run
    else:
        sigma = calibrate_sigma(recipe["epsilon"], recipe["delta"], q, recipe["steps"], recipe["accountant"],
                                history=ledger.accounted)
    planned = int(state.get("planned_steps", recipe["steps"]))
    todo = ledger.steps_left(sigma, q, planned - done)
    if todo == 0 and planned - done > 0:
        raise BudgetExhaustedError(f"the privacy budget is spent: epsilon {ledger.epsilon():.3f} of "
                                   f"{ledger.target_epsilon} on {ledger.dataset}; no further step is allowed")
    if todo < planned - done:
        _say(f"the budget allows {todo} of the {planned - done} remaining steps; stopping there")
    return sigma, planned, todo


def _finish(ema_model: nn.Module, data: _Data, device, progress: bool, train_time: float) -> dict | None:
    """Stage 8, the test metrics of the EMA weights (on the main process; every process gets them)."""
    metrics = None
    if distributed.is_main():
        metrics = evaluate(ema_model, data.test, device=device, progress=progress)
        metrics["train_time_s"] = round(train_time, 1)
        if distributed.world()[1] > 1:
            metrics["processes"] = distributed.world()[1]
    return distributed.broadcast_json(metrics)


def _run(model: nn.Module, *, model_name: str, card: dict, recipe: dict, ledger: Ledger | None,
         parent: dict | None = None, seed_source: str | None = None, out_dir: str | Path | None, data_dir,
         seed: int | None, device, checkpoint_every: int | None, test_subset: int | None, progress: bool,
         resume: bool, download: bool, keep: int = 2, requested: dict | None = None, init: dict | None = None,
         recipe_choice: dict | None = None) -> dict:
    """The training run of :func:`train` and :func:`finetune`, in named stages: the run folder
    (:func:`_open_folder`), resuming (:func:`_restore`), the data (:func:`_prepare_data`), the ledger
    (:func:`_open_ledger`), the statistics (:func:`_release_statistics`), the plan (:func:`_plan`), the steps (the one
    :class:`~zoo.dp.step.DPStep`, with checkpoints), the evaluation (:func:`_finish`). ``out_dir`` holds one run;
    ``resume`` continues the run there with its own recipe and seed and refuses ``requested`` settings that differ
    from them. ``init``: what the weights started from (a fine-tuned checkpoint), recorded and compared."""
    device = _resolve_device(device)
    out = Path(out_dir) if out_dir else None
    resume_from = _open_folder(out, resume)
    state: dict[str, Any] = {}
    tensors = None
    if resume_from is not None:
        state, tensors, card, model, ledger = _restore(resume_from, out, {
            "seed": seed, **(requested or {}), "model": model_name, "init": init, "test_subset": test_subset})
        recipe, seed = state["recipe"], state["seed"]
        test_subset = state.get("test_subset", test_subset)
    seed, source = _resolve_seed(seed)
    seed_source = state.get("seed_source") or seed_source or source
    if recipe.get("prune") and not gate_modules(model):  # before any data is read or budget spent
        raise ValueError(f"recipe prune=true prunes an L0 model at the end of training, but {model_name!r} has no "
                         "gates; train a gated variant (--model-arg l0=true) or set --prune false")
    data = _prepare_data(model, model_name, card, recipe, ledger, data_dir, test_subset, download)
    trainable, total = set_trainable(model, recipe.get("trainable"))  # before any release: a bad spec spends none
    n = len(data.train)
    q = recipe["batch_size"] / n
    if q > 1:
        raise ValueError(f"batch_size {recipe['batch_size']} exceeds the {n} training samples")
    ledger = _open_ledger(ledger, data.info, n, recipe, parent, init, recipe_choice)
    _release_statistics(model, model_name, data.train, recipe, ledger, fresh=tensors is None, seed=seed,
                        device=device, init=init, parent=parent, progress=progress and distributed.is_main())
    sigma, planned, todo = _plan(recipe, ledger, state, q)
    done = int(state.get("step", 0))
    before = int(state.get("ledger_steps_before", ledger.steps))  # steps of an inherited ledger (fine-tuning)

    # stage 7, the steps
    model.to(device)
    distributed.broadcast_module(model)  # every rank starts from rank 0's weights
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(recipe["ema_decay"]))  # copy before hooks
    align = AlignSettings.from_recipe(recipe)
    aligned = align.mode != "off"
    psg = AlignedPerSampleGradients(model, align) if aligned else PerSampleGradients(model)
    # one group, plus one per L0 gate scale k (log_alpha at k times the lr: SGD on log_alpha / k, zoo.nn.sparse)
    opt = torch.optim.SGD(optimizer_groups(model), lr=recipe["lr"], momentum=recipe["momentum"])
    if tensors is not None:
        ckpt.load_training_state(tensors, model, ema.module, opt)
        ema.n_averaged.fill_(max(done, 1))
    model_args = {**card["args"], "num_classes": model.num_classes, "in_chans": model.in_chans}
    k = recipe["augmult"]
    params = dict(psg.params)
    facts = {"trainable": {"spec": recipe.get("trainable") or "all", "params": trainable, "of": total},
             "hardware": ckpt.hardware(), "seed": "withheld: drawn from the OS, never published" if
             seed_source.startswith("secret") else "a user-given seed (a measurement, not a private release)"}
    samples = 0  # training samples x views through the per-sample gradient, this session
    t0 = time.time()

    def totals() -> tuple[float, int]:
        """Training wall time (s) and samples x views so far, this session's plus the resumed checkpoint's."""
        return (round(time.time() - t0 + state.get("train_time_s", 0.0), 1),
                samples + int(state.get("samples_processed", 0)))

    def save(path: Path, final: bool, metrics: dict | None = None, pruned: tuple | None = None) -> Path:
        """A step checkpoint (the training state), or the final one: the EMA weights, or with ``pruned`` (the pruned
        EMA model and :func:`zoo.prune`'s report) the pruned network, whose sidecar card has its arguments."""
        wall, seen = totals()
        st = {"step": done, "sigma": sigma, "planned_steps": planned, "recipe": recipe, "seed_source": seed_source,
              "ledger_steps_before": before, "init": init, "test_subset": test_subset, "train_time_s": wall,
              "samples_processed": seen}
        if not final:
            st["seed"] = seed  # private working state; the released checkpoint omits it
        training = {**facts, "wall_time_s": wall, "samples_processed": seen}
        if pruned is not None:
            small, report = pruned
            args = {**report["args"], "num_classes": small.num_classes, "in_chans": small.in_chans}
            training["pruning"] = {"from_args": model_args, **{k: v for k, v in report.items() if k != "args"}}
            return ckpt.save_checkpoint(path, model=small, model_name=model_name, model_args=args,
                                        card=pruned_card(card, report["args"]),
                                        ledger=ledger.to_dict(), metrics=metrics, train_state=st,
                                        weights_only_ema=True, preparation=data.prep, training=training)
        return ckpt.save_checkpoint(path, model=model, model_name=model_name, model_args=model_args, card=card,
                                    ledger=ledger.to_dict(), metrics=metrics, ema=ema.module,
                                    optimizer=None if final else opt, train_state=st, weights_only_ema=final,
                                    preparation=data.prep, training=training)

    def batches_for(idx: torch.Tensor, aug_gen: torch.Generator):
        """This rank's physical batches of the sampled ``idx``; every rank draws all views (zoo.dp.distributed)."""
        return distributed.shard(_with_views(data.train.batch(chunk), k, aug_gen, device, data.info, recipe)
                                 for chunk in (idx.split(recipe["physical_batch_size"]) if len(idx) else ()))

    dp_step = DPStep(psg, opt, n=n, sample_rate=q, sigma=sigma, clip_norm=recipe["clip_norm"], expected_batch=q * n,
                     views=k, seed=seed, device=device, score=data.task.score)
    every = checkpoint_every or max(1, planned // 10)
    writes = out is not None and distributed.is_main()  # one process writes the checkpoints (one ledger)
    bar = tqdm(total=todo, desc=f"DP-SGD {model_name}", disable=not (progress and distributed.is_main()),
               dynamic_ncols=True)
    model.train()
    end = done + todo
    # un-augmented views repeat: fixed front ends (a ScatterNet's scattering) compute each training image once
    with memoized_fixed_layers(MEMO_BYTES if k == 1 else 0):
        for step in range(done, end):
            if aligned:  # the public reference: an EMA of the updates released so far (zoo.dp.alignment)
                psg.set_reference({name: opt.state[p].get(REFERENCE_SLOT) for name, p in params.items()})
            for group in opt.param_groups:  # a function of the step alone: public, resumes exactly (zoo.schedule)
                group["lr"] = recipe["lr"] * group["lr_scale"] * lr_factor(recipe.get("lr_schedule"), step, planned)
            idx, grads, loss_sum, score = dp_step(step, batches_for)  # empty idx: noise only
            samples += len(idx) * k
            if aligned:
                update_reference(opt.state, params, grads)  # from the released, noisy gradient only
            ema.update_parameters(model)
            ledger.record(sigma, q)
            done = step + 1
            if done % max(1, todo // 50) == 0 or done == planned:
                bar.set_postfix(loss=f"{loss_sum / max(len(idx), 1):.3f}",
                                **{data.task.score_name: f"{score / max(len(idx), 1):.3f}"},
                                eps=f"{ledger.epsilon():.2f}", refresh=False)
            bar.update()
            if writes and (done % every == 0 or done == end):
                save(out / f"step-{done:06d}", final=False)
                _rotate(out, keep)
    bar.close()
    psg.close()

    # stage 8, evaluation and the final checkpoint (the pruned network when the recipe prunes: same outputs)
    final_model, pruned = ema.module, None
    if recipe.get("prune"):
        pruned = prune(ema.module, input_size=tuple(data.prep["input_size"]))
        final_model = pruned[0]
        _say(f"pruned: {pruned[1]['params_before']:,} -> {pruned[1]['params_after']:,} parameters, "
             f"{pruned[1]['flops_before'] / 1e6:.1f} -> {pruned[1]['flops_after'] / 1e6:.1f} MFLOPs")
    metrics = _finish(final_model, data, device, progress, time.time() - t0)
    facts["wall_time_s"], facts["samples_processed"] = totals()
    result = {"model": model_name, "dataset": data.info.name, "test": metrics, "ledger": ledger.to_dict(),
              "noise_multiplier": sigma, "sample_rate": q, "steps": ledger.steps, "recipe": recipe,
              "rng": seed_source, "hardware": ckpt.hardware(), "training": facts, "preparation": data.prep,
              "num_params": sum(p.numel() for p in params.values())}
    if pruned is not None:
        result["pruning"] = pruned[1]
    if out:
        result["checkpoint"] = str(ckpt.paths(out / "final")[0])
    if writes:
        save(out / "final", final=True, metrics=metrics, pruned=pruned)
        write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    distributed.barrier()  # the other ranks return once the final checkpoint exists
    result["model_object"] = final_model
    return result


def train(name: str, *, out_dir: str | Path | None = None, data_dir: str | Path | None = None,
          seed: int | None = None, device: str | None = None, resume: bool = False,
          checkpoint_every: int | None = None, test_subset: int | None = None, progress: bool = True,
          download: bool = False, model_args: dict | None = None, auto_recipe: bool | None = None,
          **recipe_overrides: Any) -> dict:
    """Train registered model ``name`` from scratch with DP-SGD under its card's recipe.

    ``recipe_overrides`` replace recipe fields (epsilon, delta, steps, batch_size, dataset, ...); the model is
    built for the data set's classes and channels, and ``model_args`` override the card's architecture
    arguments (e.g. ``{"l0_lambda": 0.01}``); checkpoints record the arguments used. With ``out_dir``,
    checkpoints ``step-*`` (resumable with ``resume=True``), ``final`` (EMA weights, ledger, metrics) and
    ``result.json`` are written there. Returns the result dict (``model_object`` holds the EMA model, pruned
    when the recipe prunes: then ``pruning`` holds :func:`zoo.prune`'s report).
    Started by ``torchrun``, the processes train one model together (:mod:`zoo.dp.distributed`).
    ``auto_recipe`` (default: on for data given by path): delta, batch size, steps and K chosen for the data set's
    N and epsilon (:mod:`zoo.training.auto_recipe`) where not given; ``False`` keeps the card's.
    """
    with distributed.process_group(device):  # under torchrun: one DP-SGD run over all processes
        card = get_card(name)
        recipe_overrides, choice = _auto(card, recipe_overrides, auto_recipe)
        recipe = _recipe(card, recipe_overrides)
        given_seed = seed
        seed, source = _resolve_seed(seed)  # before building: the initialisation is part of the reproducible run
        info = get_dataset_info(recipe["dataset"])
        recipe["dataset"] = info.name  # a path is recorded resolved
        card = {**card, "args": {**card["args"], **(model_args or {})}}
        model = build(card, num_classes=info.num_classes, in_chans=info.in_chans)
        requested = {**{k: v for k, v in recipe_overrides.items() if v is not None}, "model_args": model_args,
                     "seed": given_seed}
        if "dataset" in requested:
            requested["dataset"] = info.name
        with _fixed_layer_memo(model):
            return _run(model, model_name=name, card=card, recipe=recipe, ledger=None, seed_source=source,
                        out_dir=out_dir, data_dir=data_dir, seed=seed, device=device,
                        checkpoint_every=checkpoint_every, test_subset=test_subset, progress=progress, resume=resume,
                        download=download, requested=requested, recipe_choice=choice)


def _auto(card: dict, overrides: dict, auto: bool | None) -> tuple[dict, dict | None]:
    """``(overrides with the recipe fields chosen for the data, the ledger's record of the choice)``: the choice of
    :mod:`zoo.training.auto_recipe` for data given by path (or wherever ``auto`` is true), else ``(overrides, None)``."""
    from zoo.training import auto_recipe
    dataset = overrides.get("dataset") or card["recipe"]["dataset"]
    info = get_dataset_info(dataset)
    if auto is False or (auto is None and not hasattr(info, "manifest")):
        return overrides, None
    epsilon = overrides.get("epsilon", card["recipe"]["epsilon"])
    n = overrides.get("train_subset") or len(info.load("train").targets)
    values, record = auto_recipe.choose(n, float(epsilon), {k: v for k, v in overrides.items() if v is not None},
                                        overrides.get("accountant") or card["recipe"]["accountant"])
    _say(auto_recipe.describe(record))
    return {**overrides, **values}, record


def finetune(name_or_checkpoint: str | Path, dataset: str, epsilon: float, delta: float | None = None, *,
             out_dir: str | Path | None = None, data_dir: str | Path | None = None, seed: int | None = None,
             device: str | None = None, resume: bool = False, checkpoint_every: int | None = None,
             test_subset: int | None = None, progress: bool = True, download: bool = False,
             auto_recipe: bool | None = None, **recipe_overrides: Any) -> dict:
    """Privately fine-tune a checkpoint (a path, or a registered name with a pretrained checkpoint).

    The head is reset when ``dataset`` differs from the checkpoint's or has another number of classes; grayscale
    images are repeated to the model's input channels (an RGB checkpoint on X-rays,
    :meth:`zoo.data.ArrayDataset.with_channels`).
    Privacy: on the *same* data set the inherited ledger composes with this run and ``epsilon`` is the
    total budget; on another data set a fresh ledger starts and the old one is kept as its ``parent``.
    """
    with distributed.process_group(device):
        model, sidecar, _ = load_verified(name_or_checkpoint)  # a published one states ledger and preparation
        card = sidecar["card"]
        info = get_dataset_info(dataset)
        dataset = info.name  # a path is recorded resolved
        old = sidecar.get("ledger")
        # the same data set, by name or (data given by path, moved or renamed) by content: the budgets compose
        same = old is not None and (old["dataset"] == dataset or _same_content(old.get("manifest"), info))
        if not same or model.num_classes != info.num_classes:
            model.reset_classifier(info.num_classes)
        recipe_overrides, choice = _auto(card, {**recipe_overrides, "dataset": dataset, "epsilon": epsilon,
                                                "delta": delta}, auto_recipe)
        delta = recipe_overrides["delta"]
        if delta is None:
            raise ValueError(f"fine-tuning on {dataset} needs delta (below 1/N of its training set); only for data "
                             "given by path does zoo choose it (zoo.training.auto_recipe)")
        recipe = _recipe(card, recipe_overrides)
        ledger = None
        if same:
            ledger = Ledger.from_dict(old)
            ledger.target_epsilon, ledger.delta = epsilon, delta
        requested = {k: v for k, v in {**recipe_overrides, "dataset": dataset, "epsilon": epsilon,
                                       "delta": delta}.items() if v is not None}
        with _fixed_layer_memo(model):
            return _run(model, model_name=sidecar["model"], card=card, recipe=recipe, ledger=ledger,
                        parent=None if same else old, out_dir=out_dir, data_dir=data_dir, seed=seed, device=device,
                        checkpoint_every=checkpoint_every, test_subset=test_subset, progress=progress,
                        resume=resume, download=download, requested=requested, recipe_choice=choice,
                        init={"checkpoint_sha256": sidecar["sha256"], "model": sidecar["model"]})
