"""Registry, card schema and the generated MODEL_CARD.md."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from zoo.catalog.cards import CARDS_DIR, CardError, validate_card
from zoo.catalog.registry import DuplicateModelError, UnknownModelError, builtin_models, get_card
from zoo.render import MODEL_CARD_PATH, render_model_card


def test_list_models_pattern():
    assert zoo.list_models("wrn*") == sorted(n for n in zoo.list_models() if n.startswith("wrn"))
    assert "wrn16-4" in zoo.list_models() and "test-wrn10-1" in zoo.list_models("test-*")
    assert {n.split(".")[0] for n in zoo.list_models(pretrained=True)} <= set(zoo.list_models())  # NAME.TAG


FIXTURES = Path(__file__).resolve().parent / "models"


def test_every_card_file_is_registered():
    """The public cards of models/ and the test suite's fixtures (tests/models, registered by conftest)."""
    public = [p.stem for p in CARDS_DIR.glob("*.json")]
    fixtures = [p.stem for p in FIXTURES.glob("*.json")]
    assert fixtures and all(n.startswith("test-") for n in fixtures)
    assert not [n for n in public if n.startswith("test-")]  # no fixture among the public models
    assert sorted(public + fixtures) == zoo.list_models()
    assert builtin_models() == sorted(public)  # what MODEL_CARD.md describes


def test_fixtures_are_not_public_models():
    """Outside the test suite (no $ZOO_CARDS), zoo lists exactly the cards of models/: no ``test-*`` fixture in
    ``zoo.list_models()``, ``zoo list`` or MODEL_CARD.md."""
    env = {k: v for k, v in os.environ.items() if k != "ZOO_CARDS"}
    out = subprocess.run([sys.executable, "-c", "import zoo, json; print(json.dumps(zoo.list_models()))"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == sorted(p.stem for p in CARDS_DIR.glob("*.json"))
    listed = subprocess.run([sys.executable, "-m", "zoo", "list"], env=env, capture_output=True, text=True,
                            check=True).stdout
    assert "wrn16-4" in listed and "test-" not in listed
    card_md = MODEL_CARD_PATH.read_text()
    assert not [n for n in zoo.list_models("test-*") if f"| `{n}` |" in card_md or f"### `{n}`" in card_md]
    assert "TEST ONLY" not in card_md  # every fixture's summary starts so


def test_unknown_model_suggests_closest():
    with pytest.raises(UnknownModelError, match="Did you mean 'wrn16-4'"):
        zoo.create_model("wrn16_4")
    with pytest.raises(UnknownModelError):
        zoo.model_info("no-such-model")


def test_duplicate_registration_raises():
    with pytest.raises(DuplicateModelError):
        zoo.register_model(copy.deepcopy(get_card("wrn16-4")))


def test_card_schema_rejects_unknown_and_missing():
    card = copy.deepcopy(get_card("wrn16-4"))
    card["recipe"]["learning_rate"] = 1.0
    with pytest.raises(CardError, match="unknown key.*learning_rate"):
        validate_card(card)
    card = copy.deepcopy(get_card("wrn16-4"))
    del card["recipe"]["clip_norm"]
    with pytest.raises(CardError, match="missing required field 'clip_norm'"):
        validate_card(card)
    card = copy.deepcopy(get_card("wrn16-4"))
    card["num_classes"] = "10"
    with pytest.raises(CardError, match="num_classes"):
        validate_card(card)
    card = copy.deepcopy(get_card("wrn16-4"))
    card["results"] = [{"dataset": "cifar10", "metric": "accuracy", "value": 0.5}]
    with pytest.raises(CardError, match="missing required field"):
        validate_card(card)


def test_card_on_disk_is_schema_checked(tmp_path):
    from zoo.catalog.cards import load_card

    card = json.loads((CARDS_DIR / "wrn16-4.json").read_text())
    card["colour"] = "blue"
    path = tmp_path / "wrn16-4.json"
    path.write_text(json.dumps(card))
    with pytest.raises(CardError, match="colour"):
        load_card(path)


def test_pretrained_without_checkpoint_explains():
    name = next(n for n in zoo.list_models() if not get_card(n)["checkpoints"])
    with pytest.raises(FileNotFoundError, match="no pretrained checkpoint"):
        zoo.create_model(name, pretrained=True)


def test_model_card_md_is_fresh():
    text = render_model_card([zoo.model_info(n) for n in builtin_models()])
    assert MODEL_CARD_PATH.read_text() == text, "MODEL_CARD.md is stale: run `zoo card`"


def test_family_modules_name_each_family_of_zoo_models():
    """zoo.models.FAMILY_MODULES (what the registry imports on first use) lists exactly the families that the modules
    of zoo.models register, each under the module that registers it."""
    import importlib
    import pkgutil

    import zoo.models
    from zoo.models import FAMILY_MODULES
    from zoo.models import _FAMILIES, get_family

    for info in pkgutil.iter_modules(zoo.models.__path__):
        importlib.import_module(f"zoo.models.{info.name}")
    shipped = {n: c.__module__.rsplit(".", 1)[-1] for n, c in _FAMILIES.items() if c.__module__.startswith("zoo.models.")}
    assert shipped == FAMILY_MODULES
    assert all(get_family(n).family_name == n for n in FAMILY_MODULES)


def test_cards_from_disk_are_checked_on_first_use(tmp_path, monkeypatch):
    """load_cards defers the checks that need the family's module and the data stack: a user card whose args its
    family does not take, or whose data set is unknown, is listed, and refused with a CardError naming it when used."""
    from zoo.catalog import registry
    for name, edit, pattern in (("test-late-args", {"args": {"depth": 10, "colour": 1}}, r"takes no argument"),
                                ("test-late-data", {"recipe": {**get_card("test-wrn10-1")["recipe"],
                                                               "dataset": "no-such-data"}}, "a registered data set")):
        card = {**copy.deepcopy(get_card("test-wrn10-1")), "name": name, "checkpoints": [], "results": [], **edit}
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}.json").write_text(json.dumps(card))
        monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
        monkeypatch.setattr(registry, "_UNCHECKED", set(registry._UNCHECKED))
        registry.load_cards(folder)
        assert name in zoo.list_models()
        for use in (zoo.create_model, zoo.model_info):
            with pytest.raises(CardError, match=f"card '{name}'.*{pattern}"):
                use(name)
