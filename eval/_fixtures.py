"""The test suite's fixture models for the eval scripts whose small CPU settings use them.

The ``test-*`` cards (tiny members of each family) live in ``tests/models``: they are not public models, so
``import zoo`` does not register them. The privacy audit (``test-wrn10-1``) and the sparsity study's CPU config
(``test-wrn10-1-l0``) register them here, as the test suite does through ``$ZOO_CARDS`` (``tests/conftest.py``).
"""
from __future__ import annotations

from pathlib import Path

FIXTURE_CARDS = Path(__file__).resolve().parent.parent / "tests" / "models"


def register_fixture_models() -> None:
    """Register the cards of ``tests/models`` unless they are registered already (idempotent)."""
    import zoo

    missing = [p for p in sorted(FIXTURE_CARDS.glob("*.json")) if p.stem not in zoo.list_models()]
    if missing:
        zoo.load_cards(FIXTURE_CARDS)
