"""Configuration: params.yaml is the composition of conf/, and bad configs fail before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from charaforge.config import Params, load_params, validate_params
from charaforge.errors import ConfigError
from charaforge.pipeline.compose import compose_params


def test_params_yaml_is_the_composition_of_conf(repo_root: Path, tmp_path: Path) -> None:
    composed = tmp_path / "params.yaml"
    compose_params(repo_root, output=composed)
    committed = (repo_root / "params.yaml").read_text(encoding="utf-8")
    assert composed.read_text(encoding="utf-8") == committed, (
        "params.yaml is out of date with conf/: run `make params` and commit it"
    )


def test_committed_params_validate(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert params.model.source == "world"  # the demo's default; the tests use conf/stand_in
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


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p["eval"].update(lora_scales=[0.5, -1.0]), r"eval\.lora_scales\.1"),
        (lambda p: p["train"]["candidates"][0].update(name="base"), r"train: .*'base' is reserved"),
        (lambda p: p["train"].update(lr_warmup_steps=10_000), r"train: .*lr_warmup_steps"),
    ],
    ids=["negative_lora_scale", "reserved_candidate_name", "warmup_longer_than_training"],
)
def test_checks_that_can_fail_before_work_are_in_the_schema(
    params_dict: dict, edit: Any, expected: str
) -> None:
    edit(params_dict)
    with pytest.raises(ConfigError, match=expected):
        validate_params(params_dict)


def _fields_with_defaults(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields_with_defaults(annotation, f"{prefix}{name}.")


# Sub-sections of one backend only, each written in full by the conf file that selects it.
BACKEND_SECTIONS = {"tagger.clip": "clip", "tagger.wd14": "wd14"}


def test_every_setting_that_changes_a_result_is_in_params_yaml(repo_root: Path) -> None:
    """One source of truth: a schema default that is not in conf/ (and so params.yaml) would
    change results without `dvc params diff` or MLflow ever showing it."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    missing = []
    for key, _field in _fields_with_defaults(Params):
        backend = next((b for b in BACKEND_SECTIONS if key == b or key.startswith(f"{b}.")), None)
        if backend and raw["tagger"]["backend"] != BACKEND_SECTIONS[backend]:
            continue
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert not missing, f"settings only defaulted in the schema, not in conf/: {missing}"
