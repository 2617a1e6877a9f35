"""``zoo reproduce``: check the numbers a model card reports, against its checkpoint or against a rerun of its recipe.

Which card results are checked, and against what:

* **checkpoint** (default): the card's checkpoint is loaded with its sha256 verified against the card, and
  evaluated on its test set as ``zoo eval`` does (:func:`evaluate_checkpoint`: the recorded recipe's resolution,
  the model's input channels). It is compared with the card results *of that checkpoint*: split ``test`` and the
  dataset, accountant, delta and epsilon of the checkpoint's privacy ledger (epsilon within :data:`EPSILON_MATCH`:
  cards report the spent epsilon to two decimals). Each result is evaluated on the test subset its recorded command
  used (``--test-subset N``; the full test set otherwise) unless a subset is given. No matching result, or two for
  the same metric, is an error: the card does not say which number its checkpoint should give.
* **retrain**: each distinct ``command`` of the card's results (optionally only those at one epsilon) is parsed
  with zoo's own CLI parser (a ``zoo train`` or ``zoo finetune`` command; ``VAR=value`` prefixes such as the data
  root are ignored) and run through the same code as the CLI, into a fresh folder; its test metrics and its
  ledger's epsilon are compared with the results of that command. A result whose command is not such a command is
  reported as not reproducible by command (and fails the check).

Tolerances are absolute, in the metric's units (all of zoo's reported metrics lie in [0, 1]); the defaults are the
constants below, and ``zoo reproduce --tolerance`` overrides them. A check passes when ``|measured - reported| <=
tolerance``. The exit status of ``zoo reproduce`` is 0 when every check passes, 1 otherwise, 2 when nothing can be
checked (no checkpoint, no matching result, a tampered checkpoint, missing data).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo import runspec
from zoo.runspec import RunSpec

EVAL_TOLERANCE = 0.005
"""Default tolerance for evaluating a fixed checkpoint: 0.5 percentage points of accuracy (50 of CIFAR-10's 10,000
test images, 3 of PneumoniaMNIST's 624), 0.005 of Dice. Evaluating fixed weights on a fixed test set is
deterministic up to float rounding: across CPU and GPU kernels rounding can flip the prediction of a few near-tied
images and move Dice in the fourth decimal, and cards round reported values to 3-4 significant digits (up to 5e-4).
Other weights, another preprocessing or another test set move the metrics by more than this."""

RETRAIN_TOLERANCE = 0.02
"""Default tolerance for a rerun of a result's command. On the same hardware, software versions and thread count
a rerun with the recorded (public) seed repeats every step bit for bit, so the difference is exactly 0. On other
hardware float rounding differs from the first step on and the run becomes another draw of its randomness:
agreement is then statistical. 0.02 is about 3 standard deviations of the seed-to-seed spread reported for
WRN-16-4 on CIFAR-10 (0.7 points, De et al. 2022); small test sets (PneumoniaMNIST's 624 images) spread more,
so pass a larger ``--tolerance`` when rerunning on other hardware there."""

SPREAD_FACTOR = 3.0
"""A rerun with a fresh secret seed (a private release's command has no ``--seed``) is another draw of the recipe:
it passes when within this many standard deviations of the study's seed-to-seed spread (the card result's
``seed_std``), or within the tolerance, whichever is larger."""

EPSILON_MATCH = 0.01
"""Two epsilons are the same when they differ by at most this: cards report the spent epsilon to two decimals, and
the accountant is deterministic, so a rerun's ledger must give the reported epsilon to this precision."""


class ReproduceError(ValueError):
    """Nothing can be checked: no checkpoint, no card result that matches, or an unusable command."""


@dataclass
class Check:
    """One comparison: ``reported`` (the card's value) against ``measured`` (``None``: could not be measured)."""
    result: str  # which card result: "dataset, epsilon, delta"
    metric: str
    reported: float
    measured: float | None
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        if self.measured is None:
            return False
        return self.measured == self.reported or abs(self.measured - self.reported) <= self.tolerance  # inf == inf

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class Report:
    """All checks of one ``zoo reproduce`` run; ``ok`` when there is at least one and every one passes."""
    name: str
    mode: str  # "checkpoint" or "retrain"
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "ok": self.ok, "checks": [c.to_dict() for c in self.checks],
                "notes": self.notes}

    def table(self) -> str:
        rows = [("result", "metric", "reported", "measured", "difference", "tolerance", "ok")]
        for c in self.checks:
            m = "-" if c.measured is None else f"{c.measured:.4f}"
            d = "-" if c.measured is None else f"{c.measured - c.reported:+.4f}"
            rows.append((c.result, c.metric, f"{c.reported:.4f}", m, d, f"{c.tolerance:g}",
                         ("ok" if c.ok else "FAIL") + (f" ({c.note})" if c.note else "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        verdict = "reproduced" if self.ok else "NOT reproduced"
        return "\n".join([*lines, *self.notes, f"{self.name}: {verdict} ({self.mode})"])


def _label(r: dict) -> str:
    return f"{r['dataset']}, ε={r['epsilon']:g}, δ={r['delta']:g}"


def _same_eps(a: float, b: float) -> bool:
    return a == b if math.isinf(a) or math.isinf(b) else abs(a - b) <= EPSILON_MATCH


def parse_command(command: str) -> RunSpec:
    """The run spec of a recorded ``[VAR=value ...] zoo train|finetune ...`` command, read with zoo's own parser
    (:func:`zoo.runspec.parse_command`). Raises :class:`ReproduceError` for anything else."""
    try:
        return runspec.parse_command(command)
    except runspec.CommandError as e:
        raise ReproduceError(str(e)) from None


def evaluate_checkpoint(model, sidecar: dict, data_dir=None, device: str | None = None,
                        test_subset: int | None = None, dataset: str | None = None) -> tuple[str, dict]:
    """``(dataset, test metrics)`` of a loaded checkpoint, on the test split prepared as it was trained: the data
    set of its ledger, the recipe's resolution (``resize``) and the model's input channels (what ``zoo eval``
    does); ``test_subset``: the public stratified subset of that many images (seed 0), as training evaluates.

    Data given by path must have the content the ledger's manifest records (else
    :class:`~zoo.data.DataIntegrityError`). ``dataset``: evaluate on this data set or path instead; when it holds
    the recorded content it is the same data (at another path), otherwise another data set of the same classes."""
    from zoo.data import get_dataset_info
    from zoo.training.engine import _resolve_device, evaluate, load_split

    recipe = (sidecar.get("train_state") or {}).get("recipe") or sidecar["card"]["recipe"]
    ledger = sidecar.get("ledger") or {}
    recorded = ledger.get("dataset") or recipe["dataset"]
    info = get_dataset_info(dataset or recorded)
    manifest = ledger.get("manifest")
    if hasattr(info, "manifest") and manifest and info.manifest["sha256"] != manifest["sha256"]:
        if dataset is None or info.name == recorded:  # it claims to be the training data: it must be
            info.check_same(manifest, f"checkpoint {sidecar.get('model')}")
        print(f"note: {info.name} is not the data this checkpoint was trained on ({recorded}); evaluating it as "
              "another data set")
    if info.num_classes != model.num_classes:
        raise ValueError(f"{info.name} has {info.num_classes} classes but the checkpoint predicts "
                         f"{model.num_classes}; evaluate on data with the same classes, or fine-tune first")
    test = load_split(info.name, "test", recipe, data_dir, subset=test_subset, in_chans=model.in_chans)
    dataset = info.name
    dev = _resolve_device(device)
    return dataset, evaluate(model.to(dev), test, device=dev)


def checkpoint_results(card: dict, ledger: dict, tag: str | None = None) -> list[dict]:
    """The card results of the checkpoint ``tag`` whose ledger is ``ledger`` (the matching rule of the module
    docstring; results that name another checkpoint are not its, and those that name ``tag`` come first: when any
    does, only those count). Raises :class:`ReproduceError` when none matches or a metric is reported twice."""
    found = [r for r in card["results"] if r["split"] == "test" and r["dataset"] == ledger["dataset"]
             and r.get("checkpoint") in (None, tag)
             and r["accountant"] == ledger["accountant"] and math.isclose(r["delta"], ledger["delta"], rel_tol=1e-9)
             and _same_eps(r["epsilon"], ledger["epsilon"])]
    where = f"{ledger['dataset']}, ε={ledger['epsilon']:.4g}, δ={ledger['delta']:g}, {ledger['accountant'].upper()}"
    if not found:
        have = "; ".join(sorted({_label(r) for r in card["results"]})) or "none"
        raise ReproduceError(f"no result of the card of {card['name']!r} matches its checkpoint ({where}); it "
                             f"reports: {have}. Add the checkpoint's test metrics to the card's results, or "
                             f"check a rerun instead: `zoo reproduce {card['name']} --retrain`")
    if any(r.get("checkpoint") == tag for r in found) and tag is not None:
        found = [r for r in found if r.get("checkpoint") == tag]
    metrics = [r["metric"] for r in found]
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    if twice:
        raise ReproduceError(f"the card of {card['name']!r} reports {twice} more than once for its checkpoint "
                             f"({where}): keep one result per metric at the checkpoint's (dataset, epsilon, delta)")
    return found


def _test_subset(command: str) -> int | None:
    try:
        return parse_command(command).test_subset
    except ReproduceError:
        return None  # not a zoo command: the number is taken to be on the full test set


def reproduce_checkpoint(name: str, *, tolerance: float = EVAL_TOLERANCE, data_dir=None, device: str | None = None,
                         test_subset: int | None = None) -> Report:
    """Evaluate each published checkpoint of ``name`` (``NAME.TAG``: that one only), verified
    (:func:`zoo.catalog.registry.load_published`), and compare it with the card's results of that checkpoint (module
    docstring). Raises :class:`ReproduceError` when there is no checkpoint or no matching result,
    :class:`zoo.catalog.checkpoint.CheckpointIntegrityError` for a tampered file."""
    from zoo.catalog.registry import checkpoint_path, get_card, load_published, split_name

    card = get_card(name)
    base, tag = split_name(name)
    tags = [tag] if tag else [ck["tag"] for ck in card["checkpoints"]]
    if not tags:
        raise ReproduceError(
            f"no checkpoint is published for {name!r} (its card's checkpoints are empty). Rerun the recipe of its "
            f"reported results and compare: `zoo reproduce {name} --retrain`; or train one: `zoo train {name}`")
    report = Report(name, "checkpoint")
    for t in tags:
        path = checkpoint_path(card, t)
        model, sidecar = load_published(f"{base}.{t}")
        ledger = sidecar["ledger"]
        sha = next(ck["sha256"] for ck in card["checkpoints"] if ck["tag"] == t)
        report.notes.append(f"{base}.{t}: checkpoint {path} (sha256 {sha} verified)")
        measured: dict[int | None, tuple[str, dict]] = {}
        for r in checkpoint_results(card, ledger, t):
            subset = test_subset or _test_subset(r["command"])
            if subset not in measured:
                measured[subset] = evaluate_checkpoint(model, sidecar, data_dir, device, subset)
                report.notes.append(f"{base}.{t}: evaluated on {measured[subset][1]['num_samples']} test images of "
                                    f"{measured[subset][0]}" + (f" (--test-subset {subset})" if subset else ""))
            value = measured[subset][1].get(r["metric"])
            report.checks.append(Check(f"{t}: {_label(r)}", r["metric"], r["value"], value, tolerance,
                                       "" if value is not None else f"{r['metric']} is not a metric of zoo's "
                                                                    "evaluation"))
    return report


def reproduce_by_retraining(name: str, *, tolerance: float = RETRAIN_TOLERANCE, data_dir=None,
                            device: str | None = None, out_dir: str | Path | None = None,
                            epsilon: float | None = None, progress: bool = False) -> Report:
    """Rerun each distinct command of ``name``'s card results (those at ``epsilon`` when given) and compare the new
    run's metrics and ledger epsilon with the reported ones (module docstring). Runs go to ``out_dir/run-<i>``
    (default ``runs/reproduce/<name>``); ``data_dir`` and ``device`` replace the command's."""
    from zoo.catalog.checkpoint import hardware
    from zoo.catalog.registry import get_card

    card = get_card(name)
    results = [r for r in card["results"] if epsilon is None or _same_eps(r["epsilon"], epsilon)]
    if not results:
        at = "" if epsilon is None else f" at epsilon {epsilon:g}"
        raise ReproduceError(f"the card of {name!r} reports no result{at}: there is nothing to reproduce")
    by_command: dict[str, list[dict]] = {}
    for r in results:
        by_command.setdefault(r["command"], []).append(r)
    out = Path(out_dir or Path("runs") / "reproduce" / name / time.strftime("%Y%m%d-%H%M%S"))  # a fresh folder
    report = Report(name, "retrain", notes=[f"this machine: {hardware()}"])
    for i, (command, rs) in enumerate(by_command.items()):
        try:
            args = parse_command(command)
        except ReproduceError as e:
            report.checks += [Check(_label(r), r["metric"], r["value"], None, tolerance,
                                    f"not reproducible by command: {e}") for r in rs]
            continue
        if args.cmd == "train" and args.name != name:
            report.checks += [Check(_label(r), r["metric"], r["value"], None, tolerance,
                                    f"its command trains {args.name!r}, not {name!r}") for r in rs]
            continue
        args.out, args.resume, args.progress = str(out / f"run-{i}"), False, progress
        args.data_dir, args.device = data_dir or args.data_dir, device or args.device
        seeded = "" if args.seed is not None else " (no seed recorded: a fresh secret seed, so not a replay)"
        report.notes.append(f"run-{i}: `{command}` -> {args.out}{seeded}; recorded on: "
                            + "; ".join(sorted({r['hardware'] for r in rs})))
        result = runspec.run(args)
        for r in rs:
            value = result["test"].get(r["metric"]) if result["dataset"] == r["dataset"] else None
            note = "" if value is not None else (
                f"the rerun is on {result['dataset']}" if result["dataset"] != r["dataset"]
                else f"{r['metric']} is not a metric of zoo's evaluation")
            tol = tolerance
            if args.seed is None and "seed_std" in r:  # a fresh secret seed: another draw of the recipe
                tol = max(tolerance, SPREAD_FACTOR * r["seed_std"])
                note = note or (f"fresh secret seed, so not bit-identical: compared against the study's spread, "
                                f"{SPREAD_FACTOR:g} x std {r['seed_std']:.4f} over {r['seed_n']} seeds "
                                f"({r.get('seed_spread_source', 'study')})")
            report.checks.append(Check(_label(r), r["metric"], r["value"], value, tol, note))
        for e in sorted({r["epsilon"] for r in rs}):
            report.checks.append(Check(_label({**rs[0], "epsilon": e}), "epsilon (ledger)", e,
                                       result["ledger"]["epsilon"], EPSILON_MATCH))
    return report
