"""Model cards: the one source of truth for a registered model's architecture, DP recipe and results.

A card is a JSON file ``models/<name>.json``. Its schema is checked strictly: a missing field or an unknown
key is an error (:class:`CardError`), so a typo never silently falls back to a default. This module is the schema
only (it imports nothing of zoo but :mod:`zoo.schedule`); ``MODEL_CARD.md`` is rendered from the cards by
:mod:`zoo.render` (``zoo card``) and never edited by hand.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from zoo.schedule import LR_SCHEDULES

CARDS_DIR = Path(__file__).resolve().parents[2] / "models"


class CardError(ValueError):
    """A model card does not follow the schema."""


_num = (int, float)
# field -> (type or nested schema, required)
RECIPE_SCHEMA: dict[str, tuple[Any, bool]] = {
    "dataset": (str, True),
    "epsilon": (_num, True),
    "delta": (_num, True),
    "accountant": (str, True),           # "rdp" or "prv"
    "batch_size": (int, True),           # expected logical batch B = q * N (Poisson sampling)
    "physical_batch_size": (int, True),  # samples per micro-batch (memory), each with `augmult` views
    "steps": (int, True),
    "clip_norm": (_num, True),
    "lr": (_num, True),
    "momentum": (_num, True),
    "augmult": (int, True),              # K augmented views per sample, averaged before clipping
    "ema_decay": (_num, True),
    "lr_schedule": ((str, type(None)), False),   # zoo.schedule.LR_SCHEDULES; None: constant
    "train_subset": ((int, type(None)), False),  # use a stratified subset of this many training samples
    "crop": ((int, type(None)), False),          # segmentation: train on random crops of this size
    "resize": ((int, type(None)), False),        # resize every split to this size first (e.g. X-rays 28 -> 32)
    "align": ((str, type(None)), False),          # gradient self-alignment: off, all or subset (zoo.dp.alignment)
    "align_weight": ((_num, type(None)), False),  # its lambda (default zoo.dp.alignment.DEFAULT_WEIGHT)
    "align_fraction": ((_num, type(None)), False),  # its subset fraction (default zoo.dp.alignment.DEFAULT_FRACTION)
    "norm_sigma": ((_num, type(None)), False),   # private data normalisation (zoo.dp.data_norm): its noise multiplier
    "norm_clip": ((list, type(None)), False),    # its L2 clips [c_mean, c_square] per channel group, flat
    "trainable": ((str, type(None)), False),     # which parameters DP-SGD trains (zoo.models._base.TRAINABLE_PRESETS)
    "prune": ((bool, type(None)), False),         # L0 models: the final checkpoint holds the pruned network (zoo.prune)
    "source": (str, True),               # where the recipe comes from
}
RESULT_SCHEMA: dict[str, tuple[Any, bool]] = {
    "dataset": (str, True), "split": (str, True), "metric": (str, True), "value": (_num, True),
    "epsilon": (_num, True), "delta": (_num, True), "accountant": (str, True),
    "command": (str, True),              # the command that produced this number
    "hardware": (str, True), "date": (str, True), "note": (str, False),
    "checkpoint": (str, False),          # the tag of the card's checkpoint this number was measured on
    "seed_std": (_num, False),           # std of this metric over seeds of the same recipe (a study)
    "seed_n": (int, False),              # how many seeds that std is over
    "seed_spread_source": (str, False),  # which study
}
LITERATURE_SCHEMA: dict[str, tuple[Any, bool]] = {
    "source": (str, True), "dataset": (str, True), "metric": (str, True), "value": (_num, True),
    "epsilon": (_num, True), "delta": (_num, True), "note": (str, False),
}
CHECKPOINT_SCHEMA: dict[str, tuple[Any, bool]] = {
    "tag": (str, True),     # addressed as NAME.TAG (timm's arch.tag); the first private one is NAME's default
    "file": (str, True),    # relative to the parent of the cards folder (weights/...)
    "sha256": (str, True),  # of the safetensors file; verified on every load
}
CARD_SCHEMA: dict[str, tuple[Any, bool]] = {
    "name": (str, True),
    "summary": (str, True),
    "family": (str, True),
    "args": (dict, True),
    "input_size": (list, True),
    "num_classes": (int, True),
    "recipe": (RECIPE_SCHEMA, True),
    "results": ([RESULT_SCHEMA], True),
    "literature": ([LITERATURE_SCHEMA], False),
    "checkpoints": ([CHECKPOINT_SCHEMA], True),  # published checkpoints, the default first (may be empty)
    "references": ([str], False),
}


def _check(value: Any, spec: Any, where: str) -> None:
    if isinstance(spec, tuple) and any(isinstance(s, dict) for s in spec):  # nested schema or None
        if value is None and type(None) in spec:
            return
        spec = next(s for s in spec if isinstance(s, dict))
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise CardError(f"{where}: expected an object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(spec))
        if unknown:
            raise CardError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(spec)}")
        for key, (sub, required) in spec.items():
            if key not in value:
                if required:
                    raise CardError(f"{where}: missing required field {key!r}")
                continue
            _check(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise CardError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
    elif not isinstance(value, spec) or (isinstance(value, bool) and spec in (int, _num)):
        raise CardError(f"{where}: expected {getattr(spec, '__name__', spec)}, got {value!r}")


# recipe field -> (test of a valid value, what a valid value is); None values of optional fields are not tested
_RECIPE_VALUES: dict[str, tuple[Any, str]] = {
    "epsilon": (lambda v: v > 0, "a number > 0 (inf: the noise-free reference)"),
    "delta": (lambda v: 0 < v < 1, "a number in (0, 1), below 1/N of the training set"),
    "accountant": (lambda v: v in ("rdp", "prv"), "'rdp' or 'prv'"),
    "clip_norm": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "ema_decay": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "trainable": (lambda v: bool(v.strip()), "'all', 'head', 'head+norm' or comma-separated fnmatch patterns over "
                  "parameter names (zoo.models._base.trainable_names)"),
    "lr_schedule": (lambda v: v in LR_SCHEDULES, " or ".join(map(repr, LR_SCHEDULES)) + " (zoo.schedule)"),
    "align": (lambda v: v in ("off", "all", "subset"), "'off', 'all' or 'subset' (zoo.dp.alignment)"),
    "align_weight": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "align_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "norm_sigma": (lambda v: 0 < v < math.inf, "a finite number > 0 (zoo.dp.data_norm)"),
    "norm_clip": (lambda v: len(v) >= 2 and len(v) % 2 == 0 and all(
        isinstance(c, _num) and not isinstance(c, bool) and 0 < c < math.inf for c in v),
        "finite numbers > 0, a pair [c_mean, c_square] per channel group (zoo.dp.data_norm)"),
    **{k: (lambda v: v >= 1, "an int >= 1") for k in ("batch_size", "physical_batch_size", "steps", "augmult",
                                                      "train_subset", "crop", "resize")},
}


def _bad(where: str, value: Any, expected: str, fix: str = "fix the card") -> CardError:
    return CardError(f"{where}: got {value!r}, expected {expected}; {fix}")


def pruned_card(card: dict, args: dict) -> dict:
    """The card a pruned checkpoint's sidecar records: ``card`` with the pruned network's family ``args`` (what its
    weights build, :func:`zoo.prune`'s ``report["args"]``) and a recipe that no longer prunes (fine-tuning the
    pruned network has no gates to prune)."""
    return {**card, "args": dict(args), "recipe": {**card["recipe"], "prune": False}}


def check_recipe_values(recipe: dict, where: str = "recipe", fix: str = "fix the card") -> None:
    """Raise :class:`CardError` (a ``ValueError``) naming the first recipe value out of its range
    (:data:`_RECIPE_VALUES`); ``None`` values of optional fields are not tested. The one range check of a card's
    recipe and of a run's recipe after its overrides (:func:`zoo.training.engine.train`)."""
    for key, (ok, expected) in _RECIPE_VALUES.items():
        if recipe.get(key) is not None and not ok(recipe[key]):
            raise _bad(f"{where}.{key}", recipe[key], expected, fix)


def validate_card(card: dict, source: str = "card", datasets: Sequence[str] | None = None) -> dict:
    """Check ``card`` against the schema, then its values (recipe ranges, a data set among ``datasets`` when given:
    the registered ones, see :func:`zoo.catalog.registry.register_model`; an input size of three positive ints, at least 2
    classes, a sha256 of 64 hex digits); return it unchanged. Raises :class:`CardError` naming the field, the value
    and what is expected."""
    _check(card, CARD_SCHEMA, source)
    check_recipe_values(card["recipe"], f"{source}.recipe")
    if datasets is not None:
        check_card_dataset(card, source, datasets)
    size = card["input_size"]
    if len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise _bad(f"{source}.input_size", size, "[channels, height, width], three ints >= 1")
    if card["num_classes"] < 2:
        raise _bad(f"{source}.num_classes", card["num_classes"], "an int >= 2")
    if "." in card["name"]:
        raise _bad(f"{source}.name", card["name"], "a name without '.' (NAME.TAG addresses a checkpoint)")
    tags = [ck["tag"] for ck in card["checkpoints"]]
    for i, ck in enumerate(card["checkpoints"]):
        if not re.fullmatch(r"[0-9a-f]{64}", ck["sha256"]):
            raise _bad(f"{source}.checkpoints[{i}].sha256", ck["sha256"],
                       "64 lowercase hex digits (sha256 of the weights file)")
        if not re.fullmatch(r"[a-z0-9_]+", ck["tag"]) or ck["tag"] in tags[:i]:
            raise _bad(f"{source}.checkpoints[{i}].tag", ck["tag"], "a unique tag of [a-z0-9_] (e.g. dp_eps8)")
    for i, r in enumerate(card["results"]):
        if "checkpoint" in r and r["checkpoint"] not in tags:
            raise _bad(f"{source}.results[{i}].checkpoint", r["checkpoint"], f"one of the card's tags {tags}")
    return card


def check_card_dataset(card: dict, source: str, datasets: Sequence[str]) -> None:
    """The card's recipe names one of ``datasets`` (the registered data sets), else :class:`CardError`."""
    if card["recipe"]["dataset"] not in datasets:
        raise _bad(f"{source}.recipe.dataset", card["recipe"]["dataset"], f"a registered data set: {list(datasets)}")


def load_card(path: Path, datasets: Sequence[str] | None = None) -> dict:
    """The card of file ``path`` (named ``NAME.json``), checked by :func:`validate_card`."""
    try:
        card = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CardError(f"{path}: not valid JSON ({e})") from None
    validate_card(card, str(path), datasets)
    if Path(path).stem != card["name"]:
        raise CardError(f"{path}: file name must be the model name ({card['name']}.json)")
    return card
