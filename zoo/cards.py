"""Model cards: the one source of truth for a registered model's architecture, DP recipe and results.

A card is a JSON file ``models/<name>.json``. Its schema is checked strictly: a missing field or an unknown
key is an error (:class:`CardError`), so a typo never silently falls back to a default. ``MODEL_CARD.md`` is
rendered from the cards by :func:`render_model_card` (``zoo card``) and never edited by hand.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARDS_DIR = Path(__file__).resolve().parent.parent / "models"
MODEL_CARD_PATH = CARDS_DIR.parent / "MODEL_CARD.md"
STUDIES_DIR = CARDS_DIR.parent / "eval" / "results"  # each study's results.md is included in MODEL_CARD.md


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
    "train_subset": ((int, type(None)), False),  # use a stratified subset of this many training samples
    "crop": ((int, type(None)), False),          # segmentation: train on random crops of this size
    "resize": ((int, type(None)), False),        # resize every split to this size first (e.g. X-rays 28 -> 32)
    "align": ((str, type(None)), False),          # gradient self-alignment: off, all or subset (zoo.alignment)
    "align_weight": ((_num, type(None)), False),  # its lambda (default zoo.alignment.DEFAULT_WEIGHT)
    "align_fraction": ((_num, type(None)), False),  # its subset fraction (default zoo.alignment.DEFAULT_FRACTION)
    "source": (str, True),               # where the recipe comes from
}
RESULT_SCHEMA: dict[str, tuple[Any, bool]] = {
    "dataset": (str, True), "split": (str, True), "metric": (str, True), "value": (_num, True),
    "epsilon": (_num, True), "delta": (_num, True), "accountant": (str, True),
    "command": (str, True),              # the command that produced this number
    "hardware": (str, True), "date": (str, True), "note": (str, False),
}
LITERATURE_SCHEMA: dict[str, tuple[Any, bool]] = {
    "source": (str, True), "dataset": (str, True), "metric": (str, True), "value": (_num, True),
    "epsilon": (_num, True), "delta": (_num, True), "note": (str, False),
}
CHECKPOINT_SCHEMA: dict[str, tuple[Any, bool]] = {"file": (str, True), "sha256": (str, True)}
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
    "checkpoint": ((CHECKPOINT_SCHEMA, type(None)), True),
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


def validate_card(card: dict, source: str = "card") -> dict:
    """Check ``card`` against the schema; return it unchanged. Raises :class:`CardError`."""
    _check(card, CARD_SCHEMA, source)
    if card["recipe"]["accountant"] not in ("rdp", "prv"):
        raise CardError(f"{source}.recipe.accountant: must be 'rdp' or 'prv', got {card['recipe']['accountant']!r}")
    return card


def load_card(path: Path) -> dict:
    try:
        card = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CardError(f"{path}: not valid JSON ({e})") from None
    validate_card(card, str(path))
    if Path(path).stem != card["name"]:
        raise CardError(f"{path}: file name must be the model name ({card['name']}.json)")
    return card


def _fmt(x: Any) -> str:
    return "—" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


def render_model_card(infos: list[dict], studies_dir: Path = STUDIES_DIR) -> str:
    """Render MODEL_CARD.md from :func:`zoo.model_info` dicts (deterministic: sorted by name), followed by the
    results tables of the studies under ``studies_dir`` (``*/results.md``, written by the scripts in eval/)."""
    lines = [
        "# zoo model card",
        "",
        "Generated from `models/*.json` by `zoo card`; do not edit by hand (a test fails when it is stale).",
        "",
        "| model | task | family | params | input | recipe (ε, δ, accountant) | B | steps | C | K | results | checkpoint |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    for info in sorted(infos, key=lambda i: i["name"]):
        r = info["recipe"]
        res = "; ".join(f"{x['metric']} {x['value']:.4g} at ε={_fmt(x['epsilon'])} ({x['dataset']})"
                        for x in info["results"]) or "—"
        ck = info["checkpoint"]
        ckpt = f"`{ck['file']}` sha256 `{ck['sha256'][:12]}…`" if ck else "none yet"
        lines.append(
            f"| `{info['name']}` | {info['task']} | {info['family']} | {info['num_params']:,} | {'x'.join(map(str, info['input_size']))} "
            f"| {r['dataset']}: ε={_fmt(r['epsilon'])}, δ={_fmt(r['delta'])}, {r['accountant'].upper()} "
            f"| {r['batch_size']} | {r['steps']} | {_fmt(r['clip_norm'])} | {r['augmult']} | {res} | {ckpt} |"
        )
    lines += ["", "## Details", ""]
    for info in sorted(infos, key=lambda i: i["name"]):
        lines += [f"### `{info['name']}`", "", info["summary"], "",
                  f"- architecture: `{info['family']}` with `{json.dumps(info['args'], sort_keys=True)}`",
                  f"- recipe source: {info['recipe']['source']}"]
        for x in info["results"]:
            lines.append(f"- result: {x['metric']} = {x['value']:.4g} on {x['dataset']}/{x['split']} at "
                         f"(ε={_fmt(x['epsilon'])}, δ={_fmt(x['delta'])}, {x['accountant'].upper()}), "
                         f"{x['hardware']}, {x['date']}: `{x['command']}`")
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
