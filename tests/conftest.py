"""Shared fixtures. Tests are offline: named corpora resolve to ``../shared/data``."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_data_dir(monkeypatch):
    """Point the corpus cache at the shared test data so no test touches the network."""
    monkeypatch.setenv("DEEPRNN_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("DEEPRNN_OFFLINE", "1")


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
