"""Model cards: the one source of truth for a registered model's architecture, DP recipe and results.

A card is a JSON file ``models/<name>.json``. Its schema is checked strictly: a missing field or an unknown
key is an error (:class:`CardError`), so a typo never silently falls back to a default. ``MODEL_CARD.md`` is
rendered from the cards by :func:`render_model_card` (``zoo card``) and never edited by hand.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .schedule import LR_SCHEDULES

CARDS_DIR = Path(__file__).resolve().parent.parent / "models"
MODEL_CARD_PATH = CARDS_DIR.parent / "MODEL_CARD.md"
STUDIES_DIR = CARDS_DIR.parent / "eval" / "results"  # each study's results.md is included in MODEL_CARD.md
PATH_FORMS = ("a MedMNIST-style .npz file (train_images, train_labels, optional val_*/test_*), an ImageFolder tree "
              "(train/<class>/*.png|jpg, optional val/ and test/), or for segmentation images/ + masks/ with "
              "matching file names")
"""What a recipe's ``dataset`` may name besides a registered data set: a path to data of these forms
(:mod:`zoo.path_data`); for help texts and errors."""


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
    "align": ((str, type(None)), False),          # gradient self-alignment: off, all or subset (zoo.alignment)
    "align_weight": ((_num, type(None)), False),  # its lambda (default zoo.alignment.DEFAULT_WEIGHT)
    "align_fraction": ((_num, type(None)), False),  # its subset fraction (default zoo.alignment.DEFAULT_FRACTION)
    "norm_sigma": ((_num, type(None)), False),   # private data normalisation (zoo.data_norm): its noise multiplier
    "norm_clip": ((list, type(None)), False),    # its L2 clips [c_mean, c_square] per channel group, flat
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
    "lr_schedule": (lambda v: v in LR_SCHEDULES, " or ".join(map(repr, LR_SCHEDULES)) + " (zoo.schedule)"),
    "align": (lambda v: v in ("off", "all", "subset"), "'off', 'all' or 'subset' (zoo.alignment)"),
    "align_weight": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "align_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "norm_sigma": (lambda v: 0 < v < math.inf, "a finite number > 0 (zoo.data_norm)"),
    "norm_clip": (lambda v: len(v) >= 2 and len(v) % 2 == 0 and all(
        isinstance(c, _num) and not isinstance(c, bool) and 0 < c < math.inf for c in v),
        "finite numbers > 0, a pair [c_mean, c_square] per channel group (zoo.data_norm)"),
    **{k: (lambda v: v >= 1, "an int >= 1") for k in ("batch_size", "physical_batch_size", "steps", "augmult",
                                                      "train_subset", "crop", "resize")},
}


def _bad(where: str, value: Any, expected: str, fix: str = "fix the card") -> CardError:
    return CardError(f"{where}: got {value!r}, expected {expected}; {fix}")


def check_recipe_values(recipe: dict, where: str = "recipe", fix: str = "fix the card") -> None:
    """Raise :class:`CardError` (a ``ValueError``) naming the first recipe value out of its range
    (:data:`_RECIPE_VALUES`); ``None`` values of optional fields are not tested. The one range check of a card's
    recipe and of a run's recipe after its overrides (:func:`zoo.engine.train`)."""
    for key, (ok, expected) in _RECIPE_VALUES.items():
        if recipe.get(key) is not None and not ok(recipe[key]):
            raise _bad(f"{where}.{key}", recipe[key], expected, fix)


def validate_card(card: dict, source: str = "card", check_dataset: bool = True) -> dict:
    """Check ``card`` against the schema, then its values (recipe ranges, a registered data set unless
    ``check_dataset`` is false, an input size of three positive ints, at least 2 classes, a sha256 of 64 hex digits);
    return it unchanged. Raises :class:`CardError` naming the field, the value and what is expected."""
    _check(card, CARD_SCHEMA, source)
    check_recipe_values(card["recipe"], f"{source}.recipe")
    if check_dataset:
        check_card_dataset(card, source)
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


def check_card_dataset(card: dict, source: str = "card") -> None:
    """The card's recipe names a registered data set (this imports the data stack), else :class:`CardError`."""
    from .data import list_datasets  # lazily: zoo.data imports the registry, which imports this module

    if card["recipe"]["dataset"] not in list_datasets():
        raise _bad(f"{source}.recipe.dataset", card["recipe"]["dataset"], f"a registered data set: {list_datasets()}")


def load_card(path: Path, check_dataset: bool = True) -> dict:
    try:
        card = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CardError(f"{path}: not valid JSON ({e})") from None
    validate_card(card, str(path), check_dataset)
    if Path(path).stem != card["name"]:
        raise CardError(f"{path}: file name must be the model name ({card['name']}.json)")
    return card


def _fmt(x: Any) -> str:
    return "—" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


PLOTS_DIR = CARDS_DIR / "plots"  # privacy-utility plots written by `zoo card`, linked from MODEL_CARD.md


def _group(info: dict) -> str:
    """The symmetry group of an equivariant model (with the subgroup of a restricted last stage), else "-"."""
    import inspect

    from .registry import get_family

    params = inspect.signature(get_family(info["family"])).parameters
    args = {**{k: p.default for k, p in params.items() if p.default is not p.empty}, **info["args"]}
    group = args.get("group")
    if not group:
        return "-"
    sub = f" (last stage {group[0].upper()}{int(group[1:]) // 2})" if args.get("restrict") else ""
    return group.upper() + sub


def _checkpoint_facts(info: dict):
    """``(sidecar, model)`` of ``info``'s default checkpoint, loaded verified (:func:`zoo.registry.load_published`:
    the EMA weights evaluation uses); ``(None, None)`` when the card names none or its file is not there."""
    from .registry import checkpoint_path, load_published

    try:
        path = checkpoint_path(info)
    except FileNotFoundError:  # only non-private checkpoints: none is the default
        return None, None
    if path is None or not path.exists():
        return None, None
    model, sidecar = load_published(info["name"])
    return sidecar, model


def _sparsity(info: dict, model) -> str:
    """"dense", or for an L0 model the share of open test-time gates and the expected L0 of its checkpoint's
    ``model`` (:mod:`zoo.sparse`); the gate count alone without one (``model`` None)."""
    if not (info["args"].get("l0") or info["args"].get("l0_blocks")):
        return "dense"
    import torch

    from .sparse import expected_l0, gate_modules

    if model is None:
        from .registry import build

        with torch.device("meta"):
            n = sum(g.log_alpha.numel() for g in gate_modules(build(info)))
        return f"L0, {n:,} gates (untrained)"
    with torch.no_grad():
        gates = torch.cat([g.eval().gates(1).flatten() for g in gate_modules(model)])  # test-time gates
    n, n_open = gates.numel(), int((gates > 0).sum())
    return f"L0, {n_open}/{n} gates open ({n_open / n:.0%}), expected L0 {expected_l0(model).item():.1f}"


def _training(info: dict, sidecar: dict | None) -> str:
    """Training time and hardware: the checkpoint's sidecar, else the hardware of the card's results, else "-"."""
    if sidecar is not None:
        tr = sidecar.get("training") or {}
        t = tr.get("wall_time_s", (sidecar.get("metrics") or {}).get("train_time_s"))
        n = tr.get("samples_processed")
        return (f"{'-' if t is None else f'{t:g} s'}{'' if n is None else f' ({n:,} samples x views)'} on "
                f"{tr.get('hardware', sidecar.get('hardware', '-'))} (default checkpoint; seed "
                f"{tr.get('seed', 'not recorded')})")
    hardware = sorted({r["hardware"] for r in info["results"]})
    return "; ".join(hardware) + " (card results)" if hardware else "-"


def _plot_series(infos: list[dict]) -> dict[str, dict[str, dict[str, list[tuple[float, float]]]]]:
    """``{dataset: {metric: {line label: [(epsilon, value), ...]}}}`` of the cards' test results (finite epsilon)."""
    out: dict = {}
    for info in sorted(infos, key=lambda i: i["name"]):
        deltas = {(r["dataset"], r["delta"]) for r in info["results"]}
        for r in info["results"]:
            if r["split"] != "test" or not math.isfinite(r["epsilon"]):
                continue
            several = len({d for ds, d in deltas if ds == r["dataset"]}) > 1
            label = info["name"] + (f" (δ={r['delta']:g})" if several else "")
            out.setdefault(r["dataset"], {}).setdefault(r["metric"], {}).setdefault(label, []).append(
                (float(r["epsilon"]), float(r["value"])))
    return {ds: {m: {k: sorted(v) for k, v in lines.items()} for m, lines in sorted(ms.items())}
            for ds, ms in sorted(out.items())}


def render_plots(infos: list[dict]) -> dict[str, bytes]:
    """``{file name: PNG bytes}``: per data set, one panel per reported metric of its value against epsilon, one
    line per model (the cards' results). Deterministic: matplotlib's default style, fixed size and dpi, no
    timestamp or version in the PNG metadata, so unchanged cards give identical bytes."""
    import io

    import matplotlib.style
    from matplotlib.figure import Figure

    pngs = {}
    with matplotlib.style.context("default"):
        for dataset, metrics in _plot_series(infos).items():
            fig = Figure(figsize=(4.5 * len(metrics), 3.6))
            for i, (metric, lines) in enumerate(metrics.items()):
                ax = fig.add_subplot(1, len(metrics), i + 1)
                for label, pts in lines.items():
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                eps = sorted({p[0] for pts in lines.values() for p in pts})
                ax.set_xscale("log")
                ax.set_xticks(eps, [f"{e:g}" for e in eps])
                ax.minorticks_off()
                ax.set(title=f"{dataset} test: {metric}", xlabel="ε (spent)", ylabel=metric)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
            pngs[f"{dataset}.png"] = buf.getvalue()
    return pngs


def render_model_card(infos: list[dict], studies_dir: Path = STUDIES_DIR) -> str:
    """Render MODEL_CARD.md from :func:`zoo.model_info` dicts (deterministic: sorted by name): a table of every
    model (parameters, group, sparsity, recipe, reported results, checkpoint), links to the privacy-utility plots
    of :func:`render_plots` (under :data:`PLOTS_DIR`), per-model details (results at each (ε, δ) with their commands,
    checkpoint sha256, training time and hardware), then the results tables of the studies under ``studies_dir``
    (``*/results.md``, written by the scripts in eval/). Checkpoints named by cards are read and sha256-verified."""
    infos = sorted(infos, key=lambda i: i["name"])
    facts = {i["name"]: _checkpoint_facts(i) for i in infos}
    plots = PLOTS_DIR.relative_to(MODEL_CARD_PATH.parent)
    lines = [
        "# zoo model card",
        "",
        "Generated from `models/*.json` by `zoo card`; do not edit by hand (a test fails when it is stale). "
        "`zoo reproduce NAME` checks a model's reported numbers against its checkpoint (`--retrain`: against a "
        "rerun of the recorded command).",
        "",
        "| model | task | family | group | sparsity | params | input | recipe (ε, δ, accountant) | B | steps | C | K "
        "| reported | checkpoint |",
        "|---|---|---|---|---|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    sparsity = {i["name"]: _sparsity(i, facts[i["name"]][1]) for i in infos}
    for info in infos:
        r = info["recipe"]
        by_ds: dict[str, set] = {}
        for x in info["results"]:
            by_ds.setdefault(x["dataset"], set()).add(x["epsilon"])
        res = "; ".join(f"{ds} at ε={', '.join(_fmt(float(e)) for e in sorted(eps))}"
                        for ds, eps in sorted(by_ds.items())) or "—"
        ck_cell = ", ".join(f"`.{ck['tag']}`" for ck in info["checkpoints"]) or "none"
        lines.append(
            f"| `{info['name']}` | {info['task']} | {info['family']} | {_group(info)} | {sparsity[info['name']]} "
            f"| {info['num_params']:,} | {'x'.join(map(str, info['input_size']))} "
            f"| {r['dataset']}: ε={_fmt(r['epsilon'])}, δ={_fmt(r['delta'])}, {r['accountant'].upper()} "
            f"| {r['batch_size']} | {r['steps']} | {_fmt(r['clip_norm'])} | {r['augmult']} | {res} "
            f"| {ck_cell} |")
    series = _plot_series(infos)
    if series:
        lines += ["", "## Privacy-utility plots", "",
                  "Reported test metrics against the spent ε, one line per model (from the cards' results):", ""]
        lines += [f"![{ds}: metrics vs ε]({plots}/{ds}.png)" for ds in series]
    lines += ["", "## Details", ""]
    for info in infos:
        r, (sidecar, _) = info["recipe"], facts[info["name"]]
        extra = "".join(f", {k.replace('_', ' ')} {_fmt(r[k])}" for k in ("lr_schedule", "train_subset", "crop",
                                                                           "resize", "align") if r.get(k) is not None)
        lines += [f"### `{info['name']}`", "", info["summary"], "",
                  f"- architecture: `{info['family']}` with `{json.dumps(info['args'], sort_keys=True)}`; "
                  f"{info['num_params']:,} trainable parameters; group {_group(info)}; {sparsity[info['name']]}",
                  f"- recipe: {r['dataset']}, ε={_fmt(r['epsilon'])}, δ={_fmt(r['delta'])}, "
                  f"{r['accountant'].upper()}; B={r['batch_size']}, {r['steps']} steps, K={r['augmult']}, "
                  f"clip {_fmt(r['clip_norm'])}, lr {_fmt(r['lr'])}, momentum {_fmt(r['momentum'])}, "
                  f"EMA {_fmt(r['ema_decay'])}{extra}",
                  f"- recipe source: {r['source']}",
                  *([f"- checkpoint `{info['name']}.{ck['tag']}`{' (default)' if i == 0 else ''}: `{ck['file']}`, "
                     f"sha256 `{ck['sha256']}`" for i, ck in enumerate(info["checkpoints"])] or ["- checkpoint: none"]),
                  f"- training time and hardware: {_training(info, sidecar)}"]
        runs: dict[tuple, list[dict]] = {}
        for x in info["results"]:
            key = (x["dataset"], x["split"], x["epsilon"], x["delta"], x["accountant"], x["command"], x["hardware"],
                   x["date"], x.get("checkpoint"), x.get("note", ""))
            runs.setdefault(key, []).append(x)
        if runs:
            lines += ["", "| data set | ε | δ | accountant | reported | checkpoint | hardware | date | command |",
                      "|---|---:|---:|---|---|---|---|---|---|"]
            for (ds, split, eps, delta, acc, cmd, hw, date, tag, _), xs in runs.items():
                vals = ", ".join(f"{x['metric']} {x['value']:.4g}" for x in xs)
                lines.append(f"| {ds}/{split} | {_fmt(float(eps))} | {_fmt(float(delta))} | {acc.upper()} | {vals} "
                             f"| {f'`.{tag}`' if tag else '—'} | {hw} | {date} | `{cmd}` |")
            lines.append("")
            lines += [f"- note (ε={_fmt(float(k[2]))}): {k[-1]}" for k in runs if k[-1]]
        for x in info.get("literature", []):
            lines.append(f"- literature: {x['metric']} = {x['value']:.4g} on {x['dataset']} at "
                         f"(ε={_fmt(x['epsilon'])}, δ={_fmt(x['delta'])}) — {x['source']} (not reproduced by zoo)")
        if info.get("references"):
            lines.append(f"- references: {', '.join(info['references'])}")
        lines.append("")
    studies = sorted(Path(studies_dir).glob("*/results.md"))
    if studies:
        lines += ["## Studies", ""]
        for path in studies:
            where = path.parent.relative_to(CARDS_DIR.parent) if path.is_relative_to(CARDS_DIR.parent) else path.parent
            lines += [path.read_text().strip(), "", f"(CSV and plot: `{where}/`)", ""]
    return "\n".join(lines)
