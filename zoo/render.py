"""MODEL_CARD.md and its privacy-utility plots, rendered from the registered cards (``zoo card``; never edited by hand).

Above the catalog: it describes each card's group and parameter count (:mod:`zoo.models`), loads each default
checkpoint verified (:func:`zoo.catalog.registry.load_published`) for its training facts and sparsity, and includes each
study's ``eval/results/*/results.md``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from zoo.catalog.cards import CARDS_DIR

MODEL_CARD_PATH = CARDS_DIR.parent / "MODEL_CARD.md"
STUDIES_DIR = CARDS_DIR.parent / "eval" / "results"  # each study's results.md is included in MODEL_CARD.md


def _fmt(x: Any) -> str:
    return "—" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))


PLOTS_DIR = CARDS_DIR / "plots"  # privacy-utility plots written by `zoo card`, linked from MODEL_CARD.md


def _group(info: dict) -> str:
    """The symmetry group of an equivariant model (with the subgroup of a restricted last stage), else "-"."""
    import inspect

    from zoo.models import get_family

    params = inspect.signature(get_family(info["family"])).parameters
    args = {**{k: p.default for k, p in params.items() if p.default is not p.empty}, **info["args"]}
    group = args.get("group")
    if not group:
        return "-"
    sub = f" (last stage {group[0].upper()}{int(group[1:]) // 2})" if args.get("restrict") else ""
    return group.upper() + sub


def _checkpoint_facts(info: dict):
    """``(sidecar, model)`` of ``info``'s default checkpoint, loaded verified (:func:`zoo.catalog.registry.load_published`:
    the EMA weights evaluation uses); ``(None, None)`` when the card names none or its file is not there."""
    from zoo.catalog.registry import checkpoint_path, load_published

    try:
        path = checkpoint_path(info)
    except FileNotFoundError:  # only non-private checkpoints: none is the default
        return None, None
    if path is None or not path.exists():
        return None, None
    model, sidecar = load_published(info["name"])
    return sidecar, model


def _sparsity(info: dict, model, sidecar: dict | None = None) -> str:
    """"dense", or for an L0 model the share of open test-time gates and the expected L0 of its checkpoint's
    ``model`` (:mod:`zoo.nn.sparse`); for a checkpoint published pruned (its sidecar's ``training.pruning``), the
    channels and parameters kept; the gate count alone without a checkpoint (``model`` None)."""
    if not (info["args"].get("l0") or info["args"].get("l0_blocks")):
        return "dense"
    import torch

    from zoo.nn.sparse import expected_l0, gate_modules

    pruning = ((sidecar or {}).get("training") or {}).get("pruning")
    if pruning:
        kept, of = sum(k["channels"] for k in pruning["kept"]), sum(k["of"] for k in pruning["kept"])
        return (f"L0, published pruned: {kept}/{of} gated channels kept ({kept / of:.0%}), "
                f"{pruning['params_after']:,} of {pruning['params_before']:,} parameters")

    if model is None:
        from zoo.catalog.registry import build

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
    sparsity = {i["name"]: _sparsity(i, facts[i["name"]][1], facts[i["name"]][0]) for i in infos}
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
            lines += [path.read_text().strip(), ""]
            pointer = _study_pointer(path.parent)
            lines += [pointer, ""] if pointer else []
    return "\n".join(lines)


def _study_pointer(folder: Path) -> str:
    """``(CSV and plot: `eval/results/NAME/`)``, naming only what the study's folder holds besides its table; empty
    for a table-only study."""
    kinds = [what for suffix, what in ((".csv", "CSV"), (".png", "plot")) if any(folder.glob(f"*{suffix}"))]
    if not kinds:
        return ""
    where = folder.relative_to(CARDS_DIR.parent) if folder.is_relative_to(CARDS_DIR.parent) else folder
    return f"({' and '.join(kinds)}: `{where}/`)"
