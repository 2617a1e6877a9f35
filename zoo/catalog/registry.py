"""Model registry: architecture families (Python classes) and registered models (cards).

A *family* is a class registered with :func:`zoo.models.register_family`; a *model* is a card
(``models/<name>.json``) naming a family and its arguments. ``create_model`` = family(**card args, **overrides).
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.catalog.cards import CARDS_DIR, CardError, check_card_dataset, load_card, validate_card
from zoo.models import get_family, known_families

if TYPE_CHECKING:
    from torch import nn

# torch, escnn and the data stack are imported only when a model is built or described: listing the registry (and
# `zoo list`, `zoo --help`) reads the cards alone
_MODELS: dict[str, dict] = {}
_UNCHECKED: set[str] = set()  # cards of load_cards whose family arguments and data set are checked on first use
_ROOTS: dict[str, Path] = {}  # model -> folder its card's relative checkpoint path starts from


class UnknownModelError(KeyError):
    """No model of that name is registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateModelError(ValueError):
    """A model of that name is already registered (a family: :class:`zoo.models.DuplicateFamilyError`)."""


def check_family_args(family: type[nn.Module], kwargs: dict[str, Any], where: str) -> None:
    """Raise ``TypeError`` naming the arguments of ``kwargs`` that ``family``'s constructor does not take (with the
    closest accepted names), and ``ValueError`` for a ``num_classes`` below 2 or an ``in_chans`` below 1."""
    params = inspect.signature(family).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            close = {u: difflib.get_close_matches(u, accepted, n=1) for u in unknown}
            hint = "".join(f" Did you mean {c[0]!r} for {u!r}?" for u, c in close.items() if c)
            raise TypeError(f"{where}: {family.__name__} (family {getattr(family, 'family_name', '?')!r}) takes no "
                            f"argument(s) {unknown}.{hint} It takes: {', '.join(accepted)}")
    for key, low, what in (("num_classes", 2, "classes (a single class has nothing to predict)"),
                           ("in_chans", 1, "input channels")):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{where}: {key} must be an int >= {low}, the number of {what}; got {value!r}")


def register_model(card: dict, defer_checks: bool = False) -> dict:
    """Register a model from a card (dict following :data:`zoo.catalog.cards.CARD_SCHEMA`); its ``args`` must be
    arguments of its family and its recipe's data set must be registered (a typo is a :class:`~zoo.catalog.cards.CardError`,
    not a silently ignored setting). ``defer_checks`` (what :func:`load_cards` uses): check the schema and the
    family's name now, and the two checks that need the family's module and the data stack when the card is first
    used (:func:`get_card`), so that listing models stays cheap."""
    source = f"card {card.get('name', '?')!r}"
    validate_card(card, source)
    name = card["name"]
    if name in _MODELS:
        raise DuplicateModelError(f"model {name!r} is already registered; pick another name")
    if card["family"] not in known_families():
        raise CardError(f"card {name!r}: unknown family {card['family']!r}; known: {known_families()}")
    if not defer_checks:
        _check_references(card, source)
    _MODELS[name] = card
    if defer_checks:
        _UNCHECKED.add(name)
    return card


def _check_references(card: dict, source: str) -> None:
    """The card's family takes its ``args`` and its recipe's data set is registered, else :class:`CardError`."""
    try:
        check_family_args(get_family(card["family"]), card["args"], f"{source}: args")
    except (TypeError, ValueError) as e:
        raise CardError(str(e)) from None
    from zoo.data import list_datasets  # the data stack: only when a card is first used

    check_card_dataset(card, source, list_datasets())


def user_card_dirs() -> list[Path]:
    """The folders of user cards named by ``$ZOO_CARDS`` (separated by ``os.pathsep``), loaded after ``models/``."""
    return [Path(d).expanduser() for d in os.environ.get("ZOO_CARDS", "").split(os.pathsep) if d]


def load_cards(directory: Path | None = None) -> None:
    """Register every ``*.json`` card of ``directory``; by default zoo's ``models/`` and then each folder of
    ``$ZOO_CARDS`` (your own cards: same schema, names must not clash). A card's relative ``checkpoint.file`` is
    resolved against the parent of its cards folder (``models/`` -> the repository root, where ``weights/`` is)."""
    for folder in [CARDS_DIR, *user_card_dirs()] if directory is None else [Path(directory)]:
        if not folder.is_dir():
            raise FileNotFoundError(f"cards folder {folder} does not exist (check $ZOO_CARDS)")
        for path in sorted(folder.glob("*.json")):
            card = register_model(load_card(path), defer_checks=True)
            _ROOTS[card["name"]] = folder.resolve().parent


NONPRIVATE_PREFIX = "nonprivate"
"""Tags of checkpoints trained without a privacy guarantee (epsilon = inf: public pretraining) start with this; such
a checkpoint is never a card's default, it is loaded only as ``NAME.TAG`` (:func:`checkpoint_entry`)."""


class UnknownTagError(UnknownModelError):
    """``NAME.TAG`` names a checkpoint tag that the card of NAME does not have."""


def split_name(name: str) -> tuple[str, str | None]:
    """``"wrn16-1.dp_eps8"`` -> ``("wrn16-1", "dp_eps8")``; a name without a tag -> ``(name, None)`` (timm's
    ``arch.tag``: model names contain no '.')."""
    model, dot, tag = name.partition(".")
    return model, (tag if dot else None)


def get_card(name: str) -> dict:
    """The card of ``name`` (``NAME`` or ``NAME.TAG``; a tag must be one of the card's checkpoints)."""
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a str (see zoo.list_models()), got {type(name).__name__} {name!r}")
    model, tag = split_name(name)
    try:
        card = _MODELS[model]
    except KeyError:
        close = difflib.get_close_matches(model, list(_MODELS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(
            f"unknown model {model!r}.{hint} See zoo.list_models() or `zoo list` for the {len(_MODELS)} models."
        ) from None
    if model in _UNCHECKED:  # loaded from disk: the checks deferred by load_cards, once
        _check_references(card, f"card {model!r}")
        _UNCHECKED.discard(model)
    if tag is not None:
        checkpoint_entry(card, tag)  # an unknown tag is an error that lists the tags
    return card


def checkpoint_entry(card: dict, tag: str | None = None) -> dict | None:
    """The card's checkpoint ``{tag, file, sha256}`` with ``tag`` (default: the first, the card's default), or None
    when the card publishes none; an unknown tag raises :class:`UnknownTagError` listing the card's tags."""
    entries = card["checkpoints"]
    if tag is None:  # the default: the first private checkpoint; a non-private one only when named
        private = [e for e in entries if not e["tag"].startswith(NONPRIVATE_PREFIX)]
        if entries and not private:
            raise FileNotFoundError(
                f"model {card['name']!r} publishes only non-private checkpoints "
                f"({', '.join(card['name'] + '.' + e['tag'] for e in entries)}); one is loaded only when named "
                "explicitly, as NAME.TAG")
        return private[0] if private else None
    for entry in entries:
        if entry["tag"] == tag:
            return entry
    tags = [f"{card['name']}.{e['tag']}" for e in entries]
    raise UnknownTagError(f"model {card['name']!r} has no checkpoint tagged {tag!r}; its checkpoints: "
                          f"{', '.join(tags) if tags else 'none published yet'}")


def checkpoint_path(card: dict, tag: str | None = None) -> Path | None:
    """Where ``card``'s checkpoint ``tag`` (default: its default one) is (relative paths: from the parent of the
    card's folder), or None when the card publishes none."""
    entry = checkpoint_entry(card, tag)
    if entry is None:
        return None
    return _ROOTS.get(card["name"], CARDS_DIR.parent) / entry["file"]


def resolve_checkpoint(name_or_path: str | Path) -> tuple[Path, str | None]:
    """``(checkpoint path, sha256 the card expects or None)`` for a checkpoint path or a registered ``NAME`` or
    ``NAME.TAG``."""
    path = Path(name_or_path)
    if path.exists() or path.with_suffix(".safetensors").exists():
        return path, None
    if path.suffix in (".safetensors", ".json") or "/" in str(name_or_path) or "\\" in str(name_or_path):
        raise FileNotFoundError(f"no checkpoint at {path}: give a run's checkpoint (e.g. runs/NAME/final.safetensors, "
                                "written when a run completes) or a published NAME.TAG (zoo list --pretrained)")
    card = get_card(str(name_or_path))
    _, tag = split_name(str(name_or_path))
    found = checkpoint_path(card, tag)
    if found is None:
        raise FileNotFoundError(
            f"model {card['name']!r} has no pretrained checkpoint yet; pretrained models: "
            f"{list_models(pretrained=True) or 'none published'}. Pass a checkpoint path (e.g. "
            f"runs/{card['name']}/final.safetensors) or train one with `zoo train {card['name']}`.")
    return found, checkpoint_entry(card, tag)["sha256"]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names of registered models matching the shell-style ``pattern``. With ``pretrained=True``, one
    ``NAME.TAG`` per published checkpoint whose file is present (the pattern may match ``NAME`` or ``NAME.TAG``),
    as timm lists ``arch.tag``; the first tag of a model is what ``NAME`` alone loads."""
    if not pretrained:
        return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))
    out = []
    for n in sorted(_MODELS):
        for entry in _MODELS[n]["checkpoints"]:
            full = f"{n}.{entry['tag']}"
            if (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(full, pattern)) \
                    and checkpoint_path(_MODELS[n], entry["tag"]).exists():
                out.append(full)
    return out


def builtin_models() -> list[str]:
    """Names of the models whose card is one of zoo's own (``models/``), not a ``$ZOO_CARDS`` card (a user's, or the
    test suite's ``test-*`` fixtures): what MODEL_CARD.md describes."""
    return [n for n in list_models() if _ROOTS.get(n) == CARDS_DIR.parent]


def load_checkpoint(path: str | Path, expected_sha256: str | None = None, use_ema: bool = True,
                    **overrides: Any) -> tuple[nn.Module, dict]:
    """Build the model recorded in a checkpoint's sidecar and load its verified weights (the EMA ones when present
    and ``use_ema``; :func:`zoo.catalog.checkpoint.read_checkpoint` checks the hashes). ``(model, sidecar)``."""
    from zoo.catalog.checkpoint import load_weights, read_checkpoint

    tensors, sidecar = read_checkpoint(path, expected_sha256)
    model = build(sidecar["card"], **{**sidecar["args"], **overrides})
    return load_weights(model, tensors, use_ema), sidecar


def load_published(name: str, **overrides: Any) -> tuple[nn.Module, dict]:
    """The one path from a registered ``NAME`` or ``NAME.TAG`` to its verified published model: ``(model with the
    checkpoint's EMA weights, sidecar)``. The weights' sha256 is checked against the card and the sidecar, and the
    sidecar must carry the privacy ledger and the input preparation (:func:`zoo.catalog.checkpoint.check_published`)."""
    from zoo.catalog.checkpoint import check_published

    path, sha = resolve_checkpoint(name)
    model, sidecar = load_checkpoint(path, expected_sha256=sha, **overrides)
    return model, check_published(sidecar, path)


def load_verified(name_or_path: str | Path, **overrides: Any) -> tuple[nn.Module, dict, Path]:
    """``(model, sidecar, checkpoint path)`` for a registered ``NAME`` / ``NAME.TAG`` (its published checkpoint,
    :func:`load_published`) or a checkpoint file given by path (a run's own, :func:`load_checkpoint`: hashes
    checked against its sidecar). What ``zoo eval`` and :func:`zoo.finetune` load."""
    path, sha = resolve_checkpoint(name_or_path)
    if sha is None:
        return (*load_checkpoint(path, **overrides), path)
    return (*load_published(str(name_or_path), **overrides), path)


def build(card: dict, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """``family(**card args, num_classes, in_chans, **overrides)``; arguments the family does not take, a
    ``num_classes`` below 2 or an ``in_chans`` below 1 raise before anything is built (:func:`check_family_args`)."""
    kwargs = {**card["args"], "num_classes": card["num_classes"], "in_chans": card["input_size"][0], **overrides}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    family = get_family(card["family"])
    check_family_args(family, kwargs, f"model {card['name']!r}")
    return family(**kwargs)


def create_model(name: str, pretrained: bool = False, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered name (see :func:`list_models`), or ``NAME.TAG`` for one of its checkpoints.
        pretrained: load the card's private checkpoint (the default one, or ``TAG``'s; sha256-verified, and its
            sidecar must carry the privacy ledger and the input preparation). ``model.pretrained_cfg`` then holds
            that preparation (input size, channels, mean/std, resize), as timm's ``pretrained_cfg``, plus the tag
            and the ledger; :func:`zoo.data.prepare_input` applies it to raw images. With ``num_classes``
            different from the checkpoint's, the head is reset afterwards (fine-tuning).
        num_classes: override the card's number of classes.
        **overrides: family arguments overriding the card's (e.g. ``in_chans=1``).
    """
    if not pretrained:
        return build(get_card(name), num_classes, **overrides)
    model, sidecar = load_published(name, **overrides)
    model.pretrained_cfg = {**sidecar["preparation"], "tag": split_name(name)[1] or checkpoint_entry(
        get_card(name))["tag"], "ledger": sidecar["ledger"]}
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def count_params(card: dict, **overrides: Any) -> int:
    import torch

    try:
        with torch.device("meta"):  # no memory, no initialisation
            model = build(card, **overrides)
    except (NotImplementedError, RuntimeError):  # escnn computes its bases from real tensors
        model = build(card, **overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_info(name: str) -> dict:
    """Card of ``name`` (``NAME`` or ``NAME.TAG``) plus its task (``'classification'`` or ``'segmentation'``,
    :mod:`zoo.data.tasks`), the trainable parameter count, the default checkpoint's status and ``pretrained``: per
    published tag its file, sha256, status and, when the file is present, the input preparation and the ledger's
    (ε, δ) from its sidecar (read without loading the weights; the weights are verified when they are loaded)."""
    card = get_card(name)
    info = {**card, "task": getattr(get_family(card["family"]), "task", "classification"),
            "num_params": count_params(card)}
    info.setdefault("literature", [])
    info.setdefault("references", [])
    try:
        path = checkpoint_path(card, split_name(name)[1])
        info["checkpoint_status"] = "none" if path is None else ("available" if path.exists() else f"missing: {path}")
    except FileNotFoundError:
        info["checkpoint_status"] = "only non-private checkpoints (load one as NAME.TAG)"
    info["pretrained"] = {}
    for entry in card["checkpoints"]:
        p = checkpoint_path(card, entry["tag"])
        item = {"file": str(p), "sha256": entry["sha256"], "status": "available" if p.exists() else "missing"}
        if p.exists():
            from zoo.catalog.checkpoint import published_facts

            item.update(published_facts(p))
        info["pretrained"][f"{card['name']}.{entry['tag']}"] = item
    return info
