"""Shared fixtures: the repository root and a params dictionary composed from the real conf/."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def _committed_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def params_dict(_committed_params: dict) -> dict:
    """A fresh, mutable copy of the committed params.yaml."""
    return copy.deepcopy(_committed_params)
