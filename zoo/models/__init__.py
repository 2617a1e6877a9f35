"""The architecture families of zoo.

A *family* is an ``nn.Module`` class registered here with :func:`register_family`; the catalog (:mod:`zoo.catalog.registry`)
builds a model as ``family(**card args)``. ``FAMILY_MODULES`` maps each family name to the module of ``zoo.models``
that registers it: :func:`get_family` imports that module the first time a model of its family is built or
described, so that ``import zoo``, ``zoo.list_models()`` and ``zoo list`` need neither torch nor escnn. A test checks
that each module registers exactly the families listed for it. This package imports only the layers below it
(:mod:`zoo.nn.layers`, :mod:`zoo.nn.equivariant`, :mod:`zoo.nn.sparse`), never the catalog.
"""
from __future__ import annotations

import importlib
from typing import Any

FAMILY_MODULES = {
    "wideresnet": "wideresnet",
    "resnet9": "resnet9",
    "scatternet": "scatternet",
    "eq-resnet9": "eq_resnet9",
    "eq-wideresnet": "eq_wideresnet",
    "unet": "unet",
    "eq-unet": "unet",
    "unetpp": "unetpp",
    "linknet": "linknet",
    "deeplabv3plus": "deeplab",
}

_FAMILIES: dict[str, Any] = {}


class UnknownFamilyError(ValueError):
    """No architecture family of that name is shipped or registered."""


class DuplicateFamilyError(ValueError):
    """Another class is already registered under that family name."""


def register_family(name: str):
    """Class decorator registering an architecture family under ``name``."""

    def deco(cls):
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise DuplicateFamilyError(f"family {name!r} is already registered ({_FAMILIES[name].__qualname__})")
        _FAMILIES[name] = cls
        cls.family_name = name
        return cls

    return deco


def get_family(name: str):
    """The class of family ``name``, importing the module of ``zoo.models`` that registers it on first use
    (:data:`FAMILY_MODULES`)."""
    if name not in _FAMILIES and name in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{FAMILY_MODULES[name]}")
    if name not in _FAMILIES:
        raise UnknownFamilyError(f"unknown family {name!r}; known: {known_families()}")
    return _FAMILIES[name]


def known_families() -> list[str]:
    """Names of the families zoo ships (:data:`FAMILY_MODULES`) and of those registered since."""
    return sorted({*FAMILY_MODULES, *_FAMILIES})
