"""`charaforge serve` and `charaforge generate --lora champion` with their defaults, in a folder
laid out as the pipeline leaves it (data/base, data/train, reports/metrics.json)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from engine_fixtures import (
    PROMPT,
    make_workspace,
    one_thread,  # noqa: F401  (a fixture: pytest finds it by name)
)
from PIL import Image
from serve_fixtures import free_port, write_selection
from typer.testing import CliRunner

from charaforge.cli import app
from charaforge.core.layout import checkpoint_path
from charaforge.generate.engine import GenerationEngine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder after the pipeline: data/base, data/train (r4@2 and r4@4), reports/."""
    workspace = make_workspace(tmp_path_factory.mktemp("trained"), max_steps=4)
    root = workspace / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "base").symlink_to(workspace / "base")
    (root / "data" / "train").symlink_to(workspace / "train")
    write_selection(root / "reports", "r4", 2, 0.7)
    return root


def test_generate_lora_champion_uses_the_champion_at_its_scale(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    result = CliRunner().invoke(
        app, ["generate", PROMPT, "--lora", "champion", "--steps", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    written = json.loads((project / "charaforge.json").read_text())
    assert [(lora["name"], lora["scale"]) for lora in written["loras"]] == [("r4@2", 0.7)]
    engine = GenerationEngine(project / "data" / "base", device="cpu")
    engine.load_lora("r4@2", checkpoint_path(project / "data" / "train" / "r4", 2))
    direct = engine.render(PROMPT, 0, steps=2, loras={"r4@2": 0.7})
    assert Image.open(project / "charaforge.png").tobytes() == direct.tobytes()

    # The same LoRA through a prompt tag, the last checkpoint through the candidate's name.
    result = CliRunner().invoke(
        app, ["generate", f"{PROMPT} <lora:r4:0.5>", "--steps", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    written = json.loads((project / "charaforge.json").read_text())
    assert [(lora["name"], lora["scale"]) for lora in written["loras"]] == [("r4@4", 0.5)]
    assert written["prompt"] == PROMPT

    result = CliRunner().invoke(
        app, ["generate", f"{PROMPT} <lora:nope>", "--steps", "2", "--device", "cpu"]
    )
    assert result.exit_code == 2


def test_serve_with_nothing_trained_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve"])
    assert (
        result.exit_code == 2
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    )
    assert [record.getMessage().splitlines()[0] for record in caplog.records] == [
        "nothing to serve: no trained checkpoint under data/train and no LoRA in data/loras "
        "(run the pipeline first: `dvc repro`)"
    ]


def test_serve_with_no_arguments_serves_every_checkpoint_and_the_champion(project: Path) -> None:
    port = free_port()
    command = [str(Path(sys.executable).parent / "charaforge"), "serve", "--port", str(port)]
    command += ["--device", "cpu", "--cpu-threads", "1"]  # the machine, not the content
    process = subprocess.Popen(command, cwd=project, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "charaforge serve did not start"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        listed = {item["name"]: item for item in requests.get(f"{url}/loras", timeout=30).json()}
        assert set(listed) == {"r4@2", "r4@4"}
        assert listed["r4@2"]["aliases"] == ["champion"] and listed["r4@4"]["aliases"] == ["r4"]
        assert listed["r4@2"]["default_scale"] == 0.7 and listed["r4@4"]["default_scale"] == 1.0
        assert listed["r4@2"]["trigger_words"] == ["aoi_cf"]
        body = {"prompt": "1girl <lora:champion>", "steps": 2, "seed": 1}
        served = requests.post(f"{url}/txt2img", json=body, timeout=300).json()
        parameters = served["parameters"][0]
        assert parameters["loras"][0]["name"] == "r4@2" and parameters["loras"][0]["scale"] == 0.7
        assert parameters["prompt"] == "aoi_cf, 1girl"  # the trigger from the registry
    finally:
        process.terminate()
        process.wait(timeout=30)
