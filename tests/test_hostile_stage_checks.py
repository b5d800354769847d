"""A stage refuses a bad configuration before its work starts, and cleans what a killed run left.

- a placeholder typo inside a suite file fails the `generate` stage in one line naming the file,
  the line and the placeholder, before the engine loads the base model;
- a missing `data.source`, or a file given as one, fails the `scan` stage in one line;
- the train stage's model checks (target modules, fp16 on CPU, resolution) answer from the base
  model's config files before any weights are read;
- the temporary folder a SIGKILLed atomic write leaves beside a stage's output is removed at the
  stage's next start (not a user's look-alike folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, stand_in_params_dict

from charaforge.config import ModelConfig
from charaforge.core.files import write_bytes
from charaforge.errors import ConfigError
from charaforge.generate.prompts import parse_suite
from charaforge.models.base import write_base
from charaforge.pipeline.stage import remove_stale_temps, run_stage


def _stage(workdir: Path, stage: str, params: dict) -> subprocess.CompletedProcess:
    (workdir / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_suite_placeholder_typo_names_the_file_line_and_placeholder() -> None:
    text = "studio#{trigger}, 1girl#standing\n\nstreet#{trigerr}, 1girl#walking {pose}\n"
    with pytest.raises(ConfigError) as error:
        parse_suite(text, "mine", "suites/mine.txt")
    message = str(error.value)
    assert message.startswith("suites/mine.txt:3: unknown placeholder"), message
    assert "{pose}" in message and "{trigerr}" in message and "{trigger}," not in message
    assert len(parse_suite(text.split("\n\n")[0], "mine")) == 1  # {trigger} stays valid


def test_generate_stage_refuses_a_suite_typo_before_loading_the_model(tmp_path: Path) -> None:
    # No data/base and no data/train here: had the stage loaded the engine first, it would fail
    # on those instead of naming the suite's typo.
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites/typo.txt").write_text("studio#{trigger}, 1girl#{actoin}\n")
    params = stand_in_params_dict()
    params["eval"]["suites"] = {"typo": {"file": "suites/typo.txt", "seeds": [0]}}
    line = _one_line(_stage(tmp_path, "generate", params))
    assert "suites/typo.txt:1: unknown placeholder {actoin}" in line, line
    assert not (tmp_path / "mlflow.db").exists()  # refused before its MLflow run was opened


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("no/such/folder", "data.source: no/such/folder does not exist"),
        ("params.yaml", "data.source: params.yaml is a file, not a folder"),
    ],
)
def test_scan_stage_refuses_a_missing_or_file_source_in_one_line(
    tmp_path: Path, source: str, expected: str
) -> None:
    # The first stage that reads data.source (dvc repro runs it before ingest).
    params = stand_in_params_dict()
    params["data"]["source"] = source
    params["tracking"]["enabled"] = False
    line = _one_line(_stage(tmp_path, "scan", params))
    assert expected in line, line
    assert not (tmp_path / "data").exists()


@pytest.fixture(scope="module")
def base_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/base of the stand-in, its weight files replaced by garbage: a stage that loads them
    fails, so only a check made from the config files can answer first."""
    workdir = tmp_path_factory.mktemp("base_ws")
    write_base(ModelConfig.model_validate(stand_in_params_dict()["model"]), workdir / "data/base")
    weights = [*workdir.rglob("*.safetensors"), *workdir.rglob("*.bin")]
    assert weights
    for path in weights:
        path.write_bytes(b"not weights")
    return workdir


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"train": {"target_modules": ["to_q", "no_such_layer"]}}, "train.target_modules"),
        ({"model": {"resolution": 72}}, "model.resolution: 72 is not a multiple of 16"),
        ({"train": {"mixed_precision": "fp16"}}, "train.mixed_precision: fp16 needs a CUDA GPU"),
    ],
)
def test_train_stage_answers_model_checks_from_config_files(
    base_workspace: Path, change: dict, expected: str
) -> None:
    if "mixed_precision" in change.get("train", {}) and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    params = stand_in_params_dict()
    for section, values in change.items():
        params[section].update(values)
    line = _one_line(_stage(base_workspace, "train", params))
    assert expected in line, line
    assert not (base_workspace / "mlflow.db").exists()


KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from charaforge.core.files import atomic_path
with atomic_path(sys.argv[1]) as temp:
    (temp / "images").mkdir(parents=True)
    (temp / "images/half.png").write_bytes(b"PNG half")
    os.kill(os.getpid(), signal.SIGKILL)  # mid-write: atomic_path never cleans up
"""


def _killed_write(destination: Path) -> Path:
    """What SIGKILL leaves of an atomic folder write: its temporary folder, half-filled."""
    before = set(destination.parent.glob(".*")) if destination.parent.is_dir() else set()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(destination)], env=env)
    assert killed.returncode == -signal.SIGKILL
    (left,) = set(destination.parent.glob(".*")) - before
    return left


def test_next_start_removes_what_a_killed_write_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text(
        "stages:\n  ingest:\n    cmd: x\n    outs:\n      - data/ingest\n"
        "    metrics:\n      - reports/ingest.json:\n          cache: false\n"
        "  dedupe:\n    cmd: y\n    outs:\n      - data/dedupe\n",
        encoding="utf-8",
    )
    left = [_killed_write(Path("data/ingest")), _killed_write(Path("reports/ingest.json"))]
    other_stage = _killed_write(Path("data/dedupe"))
    write_bytes("data/ingest/manifest.parquet", b"the last good output")
    look_alikes = [Path("data/.ingest.notes"), Path("data/.ingest.k3j9x2ab.bak")]
    for folder in look_alikes:
        folder.mkdir()
    assert all(folder.is_dir() for folder in left)
    assert sorted(remove_stale_temps("ingest")) == sorted(folder.as_posix() for folder in left)
    assert not any(folder.exists() for folder in left)
    assert other_stage.is_dir() and all(folder.is_dir() for folder in look_alikes)
    assert Path("data/ingest/manifest.parquet").read_bytes() == b"the last good output"


def test_a_stage_starts_by_removing_its_killed_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text("stages:\n  ingest:\n    cmd: x\n    outs:\n      - data/ingest\n")
    params = stand_in_params_dict()
    params["tracking"]["enabled"] = False
    Path("params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    left = _killed_write(Path("data/ingest"))
    seen: list[bool] = []
    run_stage("ingest", lambda ctx: seen.append(left.exists()))
    assert seen == [False]  # gone before the stage's body ran
