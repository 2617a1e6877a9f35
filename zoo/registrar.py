"""The one registry helper of zoo's ground floor (imports nothing of zoo): name -> singleton tables for the data
sets (:mod:`zoo.data`) and the tasks (:mod:`zoo.data.tasks`)."""
from __future__ import annotations


def instance_registrar(table: dict, kind: str):
    """``register(name)``, a class decorator for registries of singletons (data sets, tasks): it sets
    ``cls.name = name`` and stores ``cls()`` in ``table``; registering a name twice is an error."""

    def register(name: str):
        def deco(cls):
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            cls.name = name
            table[name] = cls()
            return cls

        return deco

    return register
