"""The package layout (README "Layout"): the import mapping from the flat layout is complete and correct, and no
code of zoo's still names a module that moved. The layer contract itself is checked by ``lint-imports``."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from relayer_imports import MOVES, absolutize, remap  # noqa: E402

OLD = "zoo." + "engine"  # spelled apart, so that this file itself names no moved module


@pytest.mark.parametrize("old,new", sorted(MOVES.items()))
def test_every_move_points_from_a_gone_module_to_a_real_one(old, new):
    importlib.import_module(new)
    package = Path(importlib.import_module("zoo").__file__).parent
    assert not (package / f"{old.split('.', 1)[1]}.py").exists()


def test_remap_rewrites_imports_attribute_paths_and_from_imports():
    assert remap(f"from {OLD} import evaluate") == "from zoo.training.engine import evaluate"
    assert remap(f'monkeypatch.setattr("{OLD}.memoized_fixed_layers", f)') == \
        'monkeypatch.setattr("zoo.training.engine.memoized_fixed_layers", f)'
    assert remap("    from zoo import registry, data as d  # both") == \
        "    from zoo.catalog import registry  # both\n    from zoo import data as d"
    assert remap("from zoo import " + "grad_sample as gs") == "from zoo.dp import grad_sample as gs"
    assert remap("import zoo.data as zd; zoo.data_norm; zoo.models.wideresnet") == \
        "import zoo.data as zd; zoo.dp.data_norm; zoo.models.wideresnet"


def test_absolutize_resolves_relative_imports_from_the_old_place():
    assert absolutize("from .cards import X\nfrom . import tan\n", "zoo.registry") == \
        "from zoo.cards import X\nfrom zoo import tan\n"
    assert absolutize("from ..layers import WSConv\nfrom ._base import B\n", "zoo.models.wideresnet") == \
        "from zoo.layers import WSConv\nfrom zoo.models._base import B\n"


def test_no_code_of_zoo_names_a_moved_module():
    files = [str(p) for d in ("zoo", "tests", "eval") for p in sorted((ROOT / d).rglob("*.py"))
             if p != Path(__file__).resolve()]
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "relayer_imports.py"), "--check", *files],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
