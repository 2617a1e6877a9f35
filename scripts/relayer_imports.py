"""Rewrite imports of zoo's modules from the flat layout (zoo 0.1, before December 2026) to the package layout.

The re-layering moved modules into packages (README, "Layout"); the public surface (``zoo.list_models``,
``create_model``, ``model_info``, ``train``, ``finetune``, ``per_sample_gradients``, ``export``, ``prune``,
``zoo.privacy``, the ``zoo`` command line) did not move. Code that imported a module directly, e.g.
``from zoo.engine import evaluate`` or ``monkeypatch.setattr("zoo.grad_sample.X", ...)``, is rewritten with::

    python scripts/relayer_imports.py FILE_OR_DIR ...        # prints the files it changes
    python scripts/relayer_imports.py --check FILE_OR_DIR ... # exit 1 if any file still names an old module

Inside zoo itself (``--package-root zoo``) relative imports are first made absolute from the file's old place, so
that the files can then be moved; that was run once, with the moves, and is kept for the record.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MOVES: dict[str, str] = {
    # the layers (torch, opacus and escnn only)
    "zoo.layers": "zoo.nn.layers",
    "zoo.eq_layers": "zoo.nn.equivariant",
    "zoo.sparse": "zoo.nn.sparse",
    # per-sample gradients, clipping and noise, accounting: no data sets, no cards
    "zoo.objectives": "zoo.dp.objectives",
    "zoo.validate": "zoo.dp.validate",
    "zoo.grad_sample": "zoo.dp.grad_sample",
    "zoo.alignment": "zoo.dp.alignment",
    "zoo.data_norm": "zoo.dp.data_norm",
    "zoo.accounting": "zoo.dp.accounting",
    "zoo.tan": "zoo.dp.tan",
    "zoo.distributed": "zoo.dp.distributed",
    # data sets and tasks (zoo.data was a module and is now the package's public face)
    "zoo.seg_data": "zoo.data.segmentation",
    "zoo.path_data": "zoo.data.folder",
    "zoo.tasks": "zoo.data.tasks",
    # the catalog: card schema, registry, checkpoints
    "zoo.cards": "zoo.catalog.cards",
    "zoo.registry": "zoo.catalog.registry",
    "zoo.checkpoint": "zoo.catalog.checkpoint",
    # training
    "zoo.engine": "zoo.training.engine",
    "zoo.auto_recipe": "zoo.training.auto_recipe",
}
"""Old module -> new module. Modules not named here kept their names (zoo.io, zoo.registrar, zoo.schedule,
zoo.models.*, zoo.data, zoo.runspec, zoo.render, zoo.publish, zoo.reproduce, zoo.cli, zoo.privacy)."""

_OLD = re.compile(r"(?<![\w.])zoo\.(" + "|".join(m.split(".", 1)[1] for m in MOVES) + r")(?![\w])")
_FROM_ZOO = re.compile(r"^(\s*)from zoo import ([\w ,]+?)\s*(#.*)?$", re.M)
_RELATIVE = re.compile(r"^(\s*)from (\.+)([\w.]*) import ", re.M)


def absolutize(text: str, module: str, is_package: bool = False) -> str:
    """``text`` (the source of ``module``) with its relative imports made absolute."""
    package = module if is_package else module.rpartition(".")[0]

    def sub(m: re.Match) -> str:
        base = package.split(".")
        base = base[:len(base) - (len(m.group(2)) - 1)]
        target = ".".join(base + ([m.group(3)] if m.group(3) else []))
        return f"{m.group(1)}from {target} import "

    return _RELATIVE.sub(sub, text)


def remap(text: str) -> str:
    """``text`` with every old module name replaced by its new one, ``from zoo import old`` included."""
    def split_from(m: re.Match) -> str:
        indent, names, comment = m.group(1), m.group(2), m.group(3)
        groups: dict[str, list[str]] = {}
        for item in (n.strip() for n in names.split(",") if n.strip()):
            name = item.split(" as ")[0].strip()
            parent, _, leaf = MOVES.get(f"zoo.{name}", f"zoo.{name}").rpartition(".")
            groups.setdefault(parent, []).append(item if leaf == name else f"{leaf} as {name}")
        lines = [f"{indent}from {p} import {', '.join(items)}" for p, items in groups.items()]
        if comment:
            lines[0] += f"  {comment}"
        return "\n".join(lines)

    text = _FROM_ZOO.sub(split_from, text)
    return _OLD.sub(lambda m: MOVES[m.group(0)], text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if an old module name is left")
    ap.add_argument("--package-root", type=Path, help="zoo's own source folder: make its relative imports absolute")
    args = ap.parse_args(argv)
    files = [f for p in args.paths for f in (sorted(p.rglob("*.py")) if p.is_dir() else [p])]
    left = 0
    for f in files:
        text = f.read_text()
        new = text
        if args.package_root and f.resolve().is_relative_to(args.package_root.resolve()):
            rel = f.resolve().relative_to(args.package_root.resolve().parent).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            new = absolutize(new, ".".join(parts[:-1] if is_package else parts), is_package)
        new = remap(new)
        if new != text:
            if args.check:
                left += 1
                print(f"{f}: names a module that moved", file=sys.stderr)
            else:
                f.write_text(new)
                print(f)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
