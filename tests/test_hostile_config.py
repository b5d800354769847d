"""Config holes closed: placeholder typos, coerced types, bad sources and overrides, model checks
answered from the model's config files (no weights)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stand_in_params_dict

from charaforge.config import TrainConfig, validate_params
from charaforge.errors import ConfigError
from charaforge.models.base import build_stand_in_pipeline
from charaforge.train.preflight import check_from_configs


def _rejected(change) -> str:
    raw = stand_in_params_dict()
    change(raw)
    with pytest.raises(ConfigError) as error:
        validate_params(raw)
    return str(error.value)


def test_unknown_prompt_placeholder_names_the_key_and_the_typo() -> None:
    message = _rejected(lambda raw: raw["eval"]["prompts"].append("{trigerr}, smiling"))
    assert "eval.prompts" in message and "{trigerr}" in message
    message = _rejected(lambda raw: raw["eval"].update(negative_prompt="{trigger} {blur}"))
    assert "eval.negative_prompt" in message and "{blur}" in message
    raw = stand_in_params_dict()
    raw["eval"]["prompts"].append("{trigger}, smiling")
    validate_params(raw)  # the known placeholder stays valid


@pytest.mark.parametrize(
    ("key", "value"),
    [(("seed",), True), (("seed",), "3"), (("eval", "steps"), True), (("eval", "steps"), "10")],
)
def test_seeds_and_counts_are_not_coerced(key: tuple[str, ...], value: object) -> None:
    def change(raw: dict) -> None:
        node = raw
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = value

    assert ".".join(key) + ": Input should be a valid integer" in _rejected(change)


def _save_configs(pipeline, folder: Path) -> Path:
    """A diffusers folder with config files only: no weights at all."""
    for part in ("unet", "vae"):
        getattr(pipeline, part).save_config(folder / part)
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "text_encoder/config.json").write_text(pipeline.text_encoder.config.to_json_string())
    return folder


def test_model_checks_run_from_config_files_without_weights(tmp_path: Path) -> None:
    folder = _save_configs(build_stand_in_pipeline("sd15", 0, 64), tmp_path / "model")
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    raw = stand_in_params_dict()["train"]
    check_from_configs(folder, TrainConfig.model_validate(raw), 64)  # the stand-in config is fine
    bad_target = TrainConfig.model_validate({**raw, "target_modules": ["to_q", "no_such_layer"]})
    with pytest.raises(ConfigError, match="train.target_modules: 'no_such_layer'"):
        check_from_configs(folder, bad_target, 64)
    with pytest.raises(ConfigError, match="model.resolution: 68"):
        check_from_configs(folder, TrainConfig.model_validate(raw), 68)
    (folder / "unet/config.json").unlink()
    with pytest.raises(ConfigError, match="model.path"):
        check_from_configs(folder, TrainConfig.model_validate(raw), 64)


def _check(repo_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        str(Path(sys.executable).parent / "charaforge"),
        "check",
        "--config-name",
        "stand_in",
    ]
    return subprocess.run(
        [*command, "--root", str(repo_root), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_check_refuses_bad_overrides_in_one_line_and_leaves_params_yaml(repo_root: Path) -> None:
    params_before = (repo_root / "params.yaml").read_bytes()
    for overrides, expected in (
        (("seed=true", "data.source=README.md"), "seed: Input should be a valid integer"),
        (("data.source=README.md",), "README.md is a file, not a folder"),
        (("eval.seeds=[0,",), "overrides: "),
    ):
        result = _check(repo_root, *overrides)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and expected in result.stderr, result.stderr
    assert (repo_root / "params.yaml").read_bytes() == params_before
