"""Configuration: params.yaml is the composition of conf/, and bad configs fail before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from charaforge.compose import compose_params
from charaforge.config import ConfigError, load_params, validate_params


def test_params_yaml_is_the_composition_of_conf(repo_root: Path, tmp_path: Path) -> None:
    composed = tmp_path / "params.yaml"
    compose_params(repo_root, output=composed)
    committed = (repo_root / "params.yaml").read_text(encoding="utf-8")
    assert composed.read_text(encoding="utf-8") == committed, (
        "params.yaml is out of date with conf/: run `make params` and commit it"
    )


def test_committed_params_validate(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert params.model.source == "stand_in"
    assert params.train.candidates


def test_override_is_applied_and_validated(repo_root: Path, tmp_path: Path) -> None:
    params = compose_params(repo_root, ["eval.seeds=[7,8,9]"], output=tmp_path / "p.yaml")
    assert params.eval.seeds == [7, 8, 9]
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        compose_params(repo_root, ["train.max_steps=zero"], output=tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists(), "a rejected composition must not be written"


def test_unknown_key_is_named(params_dict: dict) -> None:
    params_dict["train"]["learnig_rate"] = 1e-4
    with pytest.raises(ConfigError) as error:
        validate_params(params_dict)
    assert "train.learnig_rate" in str(error.value)
    assert "unknown key" in str(error.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "max_steps", "many", "train.max_steps"),
        ("model", "resolution", 60, "model.resolution"),
        ("eval", "scheduler", "warp_drive", "eval.scheduler"),
        ("data", "ingest", {"min_side": 1}, "data.ingest.max_pixels"),
    ],
)
def test_wrong_type_or_value_is_named(
    params_dict: dict, section: str, key: str, value: object, expected: str
) -> None:
    params_dict[section][key] = value
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        validate_params(params_dict)


def test_stage_refuses_bad_config_before_any_work(
    repo_root: Path, tmp_path: Path, params_dict: dict
) -> None:
    params_dict["data"]["ingest"]["max_side"] = "huge"
    params_dict["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    result = subprocess.run(
        [sys.executable, "-m", "stages.ingest"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "data.ingest.max_side" in result.stderr
    assert not (tmp_path / "data").exists(), "no output may be written when the config is bad"
