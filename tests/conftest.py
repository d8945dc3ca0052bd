"""Shared fixtures: the tiny SD stack is built once per session (it is a pure function of its seed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from d2dprompt.models import FrozenSD, build_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny() -> FrozenSD:
    return build_tiny(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_mlflow(tmp_path_factory):
    """Runs logged by tests go to a throwaway store, never the repository's mlflow.db.

    Session-scoped, so stage CLIs run by module- or session-scoped fixtures are isolated too.
    """
    store = tmp_path_factory.getbasetemp() / "mlflow"
    store.mkdir(exist_ok=True)
    previous = os.environ.get("D2D_MLFLOW_URI")
    os.environ["D2D_MLFLOW_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    yield
    if previous is None:
        os.environ.pop("D2D_MLFLOW_URI", None)
    else:
        os.environ["D2D_MLFLOW_URI"] = previous
