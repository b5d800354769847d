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


# The trainer tests share a tiny stand-in base model and dataset, built once per test module
# (module scope: a module that changes the dataset cannot leak into another).
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_models_train import STAND_IN

    from charaforge.models import write_base

    out = tmp_path_factory.mktemp("base") / "base"
    write_base(STAND_IN, out)
    return out


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_models_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("dataset") / "dataset")
