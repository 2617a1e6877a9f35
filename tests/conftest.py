"""Shared fixtures. Every test is seeded; data tests read the real data root ($ZOO_DATA, ../shared/data in CI)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = os.environ.get("ZOO_DATA")

FIXTURE_CARDS = Path(__file__).resolve().parent / "models"
"""The ``test-*`` fixture models: tiny cards that only the test suite registers, through ``$ZOO_CARDS`` (set here,
before any test imports zoo, so that ``zoo`` subprocesses and torchrun workers of the tests see them too). They are
not part of ``zoo.list_models()`` outside the tests, nor of MODEL_CARD.md; the registry-wide tests run over them
and over every public model."""
os.environ["ZOO_CARDS"] = os.pathsep.join([str(FIXTURE_CARDS), *filter(None, [os.environ.get("ZOO_CARDS")])])


def pytest_configure(config):
    if os.environ.get("CI") and not DATA:
        raise pytest.UsageError("CI must set ZOO_DATA to the data root (../shared/data); .ci/run does")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache root for the data tests of the whole session, so each data set is extracted and decoded once."""
    return tmp_path_factory.mktemp("zoo_cache")


@pytest.fixture
def isolated_cache(cache_dir, monkeypatch) -> Path:
    """ZOO_CACHE points at :func:`cache_dir` during the test (data tests: ``pytestmark = usefixtures(...)``)."""
    monkeypatch.setenv("ZOO_CACHE", str(cache_dir))
    return cache_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA:
        pytest.skip("ZOO_DATA is not set (CI sets it to ../shared/data)")
    return Path(DATA)
