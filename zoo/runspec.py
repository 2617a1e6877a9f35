"""The training commands as a typed run spec: what `zoo train` / `zoo finetune` ask for, and the one function that
runs it.

:class:`RunSpec` is read from the command line (:func:`add_training_commands` defines the two subcommands for the
``zoo`` parser of :mod:`zoo.cli`) or from a recorded command string (:func:`parse_command`, what
:mod:`zoo.reproduce` re-runs), and :func:`run` trains it. Both callers share this module and neither imports the
other. Importing it reads only the card schema: torch and the engine are imported by :func:`run`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.catalog.cards import RECIPE_SCHEMA
from zoo.io import PATH_FORMS

REGISTERED_HELP = "cifar10, isbi2012, pneumoniamnist, weizmann-horse"
"""The registered data sets, named in the help without importing the data stack (a test keeps it current)."""

RECIPE_FLAGS = [k for k in RECIPE_SCHEMA if k not in ("source", "dataset")]
"""The recipe fields a command may override, each as ``--key-with-dashes``."""
UNSET_BY_ZERO = {"train_subset": "0: all training images", "crop": "0: no crop, whole images",
                 "resize": "0: the data's own size (e.g. fine-tuning on another data set than the card's)"}
"""Recipe flags whose value 0 unsets the card's setting (None), with what that means."""

_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


class CommandError(ValueError):
    """A recorded command is not a `zoo train` or `zoo finetune` command that zoo's parser accepts."""


@dataclass
class RunSpec:
    """One `zoo train` (``cmd="train"``: a registered model from scratch) or `zoo finetune` (a checkpoint or
    pretrained model on ``dataset``) run. ``recipe``: the recipe fields given (they override the card's; the rest
    come from the card); ``recipe_mode``: ``"auto"`` (:mod:`zoo.training.auto_recipe`), ``"card"`` or None (auto for
    data given by path); ``out``: None for ``runs/<name>`` (a new run takes the first free ``runs/<name>-<i>``)."""

    cmd: str
    name: str
    dataset: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_mode: str | None = None
    data_dir: str | None = None
    out: str | None = None
    seed: int | None = None
    device: str | None = None
    resume: bool = False
    checkpoint_every: int | None = None
    test_subset: int | None = None
    download: bool = False
    progress: bool = True

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> RunSpec:
        """The spec of a parsed `zoo train` or `zoo finetune` command line."""
        recipe = {k: getattr(a, k) for k in RECIPE_FLAGS if getattr(a, k, None) is not None}
        for key in ("batch_size", "physical_batch_size", "steps", "augmult", "train_subset"):
            if key in recipe:
                recipe[key] = int(recipe[key])
        model_args = {}
        for item in getattr(a, "model_arg", []):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
            try:
                model_args[key] = json.loads(value)
            except ValueError:
                model_args[key] = value
        return cls(cmd=a.cmd, name=a.name, dataset=a.dataset, model_args=model_args, recipe=recipe,
                   recipe_mode=a.recipe, data_dir=a.data_dir, out=a.out, seed=a.seed, device=a.device,
                   resume=a.resume, checkpoint_every=a.checkpoint_every, test_subset=a.test_subset,
                   download=a.download, progress=not a.no_progress)


def _boolean(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return words[text.lower()]


def _recipe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe overrides (default: the model card's recipe)")
    for key in RECIPE_FLAGS:
        typ = RECIPE_SCHEMA[key][0]
        kinds = set(typ if isinstance(typ, tuple) else (typ,)) - {type(None)}
        kinds = set().union(*(k if isinstance(k, tuple) else (k,) for k in kinds))  # (int, float) is a number
        if list in kinds:  # norm_clip: numbers
            g.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, nargs="+", metavar="C")
            continue
        if bool in kinds:  # prune: --prune true|false
            g.add_argument(f"--{key.replace('_', '-')}", dest=key, type=_boolean, metavar="true|false")
            continue
        t = str if str in kinds else float if float in kinds else int
        g.add_argument(f"--{key.replace('_', '-')}", dest=key, type=t, help=UNSET_BY_ZERO.get(key))


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data root (default: $ZOO_DATA)")
    p.add_argument("--out", help="output folder for checkpoints and result.json (default: runs/<model>)")
    p.add_argument("--seed", type=int, help="seed for init, sampling and noise (default: a secret OS seed)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--test-subset", type=int, help="evaluate on a stratified subset of the test set")
    p.add_argument("--download", action="store_true", help="download missing data (needs network access)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--recipe", choices=["auto", "card"], help="auto: delta, batch size, steps and K chosen for the "
                   "data set's N and epsilon (zoo.training.auto_recipe; the default for data given by path); card: the "
                   "model card's recipe. Explicit flags override either")
    _recipe_args(p)


def add_training_commands(sub) -> None:
    """Add the `train` and `finetune` subcommands to the subparsers ``sub`` of an ``argparse`` parser."""
    p = sub.add_parser("train", help="train a registered model with DP-SGD")
    p.add_argument("name")
    p.add_argument("--dataset", help=f"train on this data set instead of the card's: a registered name "
                                     f"({REGISTERED_HELP}) or a path to your own data ({PATH_FORMS})")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override an architecture argument of the card; VALUE is read as JSON when it parses "
                        "(e.g. --model-arg l0_lambda=0.01); repeatable")
    _run_args(p)
    p = sub.add_parser("finetune", help="privately fine-tune a checkpoint or pretrained model")
    p.add_argument("name", help="registered name with a checkpoint, or a checkpoint path")
    p.add_argument("--dataset", required=True, help=f"a registered name ({REGISTERED_HELP}) or a path to your own "
                                                    f"data ({PATH_FORMS})")
    _run_args(p)


def parse_command(command: str) -> RunSpec:
    """The spec of a recorded ``[VAR=value ...] zoo train|finetune ...`` command (also ``python -m zoo.cli ...``),
    read with the very parser of the ``zoo`` command. Raises :class:`CommandError` for anything else."""
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise CommandError(f"cannot split the command {command!r}: {e}") from None
    while words and _ENV.match(words[0]):
        words.pop(0)  # the recorder's environment (its data root): this machine's --data-dir / ZOO_DATA is used
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "zoo.cli"]:
        words = words[3:]
    elif words and Path(words[0]).name == "zoo":
        words = words[1:]
    else:
        raise CommandError(f"{command!r} is not a zoo command")
    if not words or words[0] not in ("train", "finetune"):
        raise CommandError(f"{command!r} is not a `zoo train` or `zoo finetune` command")
    parser = argparse.ArgumentParser(prog="zoo")
    add_training_commands(parser.add_subparsers(dest="cmd", required=True))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return RunSpec.from_args(parser.parse_args(words))
    except SystemExit:
        raise CommandError(f"zoo's parser refuses {command!r}: {err.getvalue().strip().splitlines()[-1]}") from None


def _default_out(name: str, resume: bool) -> str:
    """``runs/<name>``; for a new run, the first of ``runs/<name>``, ``runs/<name>-2``, ... that holds no run (an
    explicit ``--out`` that holds one is refused instead: :class:`zoo.training.engine.RunFolderError`)."""
    from zoo.training.engine import run_files

    base = Path("runs") / name.replace("/", "_")
    if resume:
        return str(base)
    out, i = base, 1
    while run_files(out):
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    if i > 1:
        print(f"{base} holds an earlier run: writing this one to {out}", file=sys.stderr)
    return str(out)


def run(spec: RunSpec) -> dict:
    """Train ``spec`` (:func:`zoo.training.engine.train` or :func:`zoo.training.engine.finetune`): the result dict."""
    from zoo.training.engine import finetune, train

    kw = dict(spec.recipe)
    for key in UNSET_BY_ZERO:
        if kw.get(key) == 0:
            kw[key] = None
    kw.update(data_dir=spec.data_dir, seed=spec.seed, device=spec.device, resume=spec.resume,
              checkpoint_every=spec.checkpoint_every, test_subset=spec.test_subset, progress=spec.progress,
              download=spec.download, auto_recipe=None if spec.recipe_mode is None else spec.recipe_mode == "auto",
              out_dir=spec.out or _default_out(spec.name, spec.resume))
    if spec.cmd == "train":
        if spec.dataset:
            kw["dataset"] = spec.dataset
        return train(spec.name, model_args=spec.model_args, **kw)
    eps, delta = kw.pop("epsilon", None), kw.pop("delta", None)
    if eps is None:
        raise ValueError("finetune needs --epsilon (and --delta, except for data given by path, where zoo chooses "
                         "it below 1/N)")
    return finetune(spec.name, spec.dataset, eps, delta, **kw)
