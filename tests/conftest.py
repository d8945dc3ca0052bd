"""Shared fixtures: the tiny SD stack is built once per session (it is a pure function of its seed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2dprompt.models import FrozenSD, build_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny() -> FrozenSD:
    return build_tiny(0)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    """Runs logged by tests go to a throwaway store, never the repository's mlflow.db."""
    store = tmp_path_factory.getbasetemp() / "mlflow"
    store.mkdir(exist_ok=True)
    monkeypatch.setenv("D2D_MLFLOW_URI", f"sqlite:///{store / 'mlflow.db'}")
