"""`charaforge new`: the experiment file it writes composes (through DVC's own Hydra call) into
params for the user's folder, a kohya TOML is staged as ingest expects, bad options fail in one
line. The whole run through DVC is in test_pipeline.py (slow)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from charaforge.errors import ConfigError
from charaforge.pipeline import new_character
from charaforge.pipeline.compose import compose_params


@pytest.fixture
def repo(tmp_path: Path, repo_root: Path) -> Path:
    """conf/ of the project in a scratch repository (the experiment file is written there)."""
    root = tmp_path / "repo"
    shutil.copytree(repo_root / "conf", root / "conf")
    return root


def _images(folder: Path, count: int = 2, captions: str | None = None) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (40, 40), (index * 90, 40, 200)).save(folder / f"img{index}.png")
        if captions:
            (folder / f"img{index}{captions}").write_text(f"green hair, tag{index}")
    return folder


def test_the_experiment_file_composes_into_params_for_the_folder(
    repo: Path, tmp_path: Path
) -> None:
    folder = _images(tmp_path / "bob_images")
    request = new_character.NewCharacter(
        name="bob",
        trigger="bob_cf",
        source=folder,
        model="tiny_sdxl",
        tagger="clip",
        overrides=("tagger.clip.threshold=0.25", "eval.seeds=[3]"),
    )
    path = new_character.write_experiment(repo, request)
    assert path == repo / "conf/experiment/bob.yaml"
    assert path.read_text().startswith("# @package _global_\n")
    # The choices are in the file: the command line names the experiment alone.
    overrides = new_character.hydra_overrides(request)
    assert overrides == ["+experiment=bob"]
    # Composed from either primary: the world's (model world, tagger world) and the stand-in's
    # (tiny_sd15, sidecar), whose choices an experiment file's defaults must beat.
    for primary in ("config", "stand_in"):
        params = compose_params(
            repo, overrides, output=tmp_path / "params.yaml", config_name=primary
        )
        assert (params.model.family, params.model.source) == ("sdxl", "stand_in"), primary
        assert params.tagger.backend == "clip" and params.tagger.clip.threshold == 0.25, primary
    assert params.data.source == str(folder.resolve())
    assert (params.data.character, params.data.trigger) == ("bob", "bob_cf")
    assert params.tagger.clip.threshold == 0.25 and params.eval.seeds == [3]  # --set, in the file
    assert params.eval.prompts == [] and params.eval.from_data.enabled
    # Per character: the MLflow experiment and the registered model.
    assert params.tracking.experiment == "charaforge-bob"
    assert params.report.registered_model == "charaforge-bob"
    assert new_character.dvc_command(request) == [
        "dvc", "exp", "run", "-S", "+experiment=bob", "report",
    ]  # fmt: skip
    # Without --model / --tagger the primary's choices stay.
    plain = new_character.NewCharacter(name="amy", trigger="amy_cf", source=folder)
    new_character.write_experiment(repo, plain)
    params = compose_params(
        repo, ["+experiment=amy"], output=tmp_path / "plain.yaml", config_name="stand_in"
    )
    assert (params.model.family, params.tagger.backend) == ("sd15", "sidecar")


def test_a_kohya_toml_is_staged_with_txt_captions(repo: Path, tmp_path: Path) -> None:
    _images(tmp_path / "kohya/10_bob", count=3, captions=".caption")
    _images(tmp_path / "kohya/reg", count=1)
    toml = tmp_path / "kohya/dataset.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".caption"\n\n[[datasets]]\nresolution = 512\n\n'
        '[[datasets.subsets]]\nimage_dir = "10_bob"\nnum_repeats = 10\nclass_tokens = "bob_cf"\n\n'
        '[[datasets.subsets]]\nimage_dir = "reg"\nnum_repeats = 1\n'
    )
    request = new_character.NewCharacter(name="bob", trigger="bob_cf", source=toml)
    new_character.write_experiment(repo, request)
    staged = repo / "data/sources/bob"
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*.*")) == [
        "00_10_bob/img0.png", "00_10_bob/img0.txt", "00_10_bob/img1.png", "00_10_bob/img1.txt",
        "00_10_bob/img2.png", "00_10_bob/img2.txt", "01_reg/img0.png",
    ]  # fmt: skip
    assert (staged / "00_10_bob/img1.txt").read_text() == "green hair, tag1"
    config = yaml.safe_load((repo / "conf/experiment/bob.yaml").read_text())
    assert config["data"]["source"] == "data/sources/bob"
    assert config["data"]["dataset"] == {"kohya_repeats": 10}  # the first subset's num_repeats


def test_bad_options_fail_in_one_line_before_writing(repo: Path, tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs")
    cases = [
        ({"name": "bob/x"}, "--name 'bob/x'"),
        ({"trigger": "a, b"}, "--trigger"),
        ({"model": "sd99"}, "--model 'sd99': not in conf/model/; choose one of"),
        ({"source": tmp_path / "missing"}, "not found"),
    ]
    for change, message in cases:
        request = new_character.NewCharacter(
            **{"name": "bob", "trigger": "bob_cf", "source": folder, **change}
        )
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            new_character.write_experiment(repo, request)
    assert not (repo / "conf/experiment/bob.yaml").exists()


def test_the_cli_exits_2_with_one_line(repo: Path, tmp_path: Path, repo_root: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "charaforge"), "new", str(tmp_path / "nope"),
         "--name", "bob", "--trigger", "bob_cf", "--root", str(repo), "--no-run"],
        capture_output=True, text=True, cwd=repo, timeout=120,
        env={"PYTHONPATH": str(repo_root), "PATH": str(Path(sys.executable).parent)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "not found" in done.stderr


def _cli_new(repo: Path, repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "charaforge"), "new", *args, "--root", str(repo),
         "--no-run"],
        capture_output=True, text=True, cwd=repo, timeout=120,
        env={"PYTHONPATH": str(repo_root), "PATH": str(Path(sys.executable).parent)},
    )  # fmt: skip


def test_the_cli_writes_model_and_tagger_into_the_experiment(
    repo: Path, tmp_path: Path, repo_root: Path
) -> None:
    folder = _images(tmp_path / "imgs")
    name = ["--name", "bob", "--trigger", "bob_cf"]
    for flag, value in (("--model", "sd99"), ("--tagger", "wd99")):
        done = _cli_new(repo, repo_root, str(folder), *name, flag, value)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        group = flag.removeprefix("--")
        existing = sorted(p.stem for p in (repo_root / "conf" / group).glob("*.yaml"))
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{flag} '{value}'" in lines[0] and ", ".join(existing) in lines[0], lines[0]
    assert not (repo / "conf/experiment/bob.yaml").exists()

    done = _cli_new(repo, repo_root, str(folder), *name, "--model", "tiny_sdxl", "--tagger", "clip")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dvc exp run -S +experiment=bob report"
    config = yaml.safe_load((repo / "conf/experiment/bob.yaml").read_text())
    assert config["defaults"] == [
        {"override /model": "tiny_sdxl"}, {"override /tagger": "clip"}, "_self_",
    ]  # fmt: skip
