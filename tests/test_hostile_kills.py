"""Kills: a run stopped after a checkpoint and resumed into a fresh output folder (DVC clears its
outputs) gives the bytes of an uninterrupted run, validation samples included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_train_resume import Crash, _crash_at, _files, resume_config

from charaforge.train import train_candidate


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
def test_resume_into_fresh_output_rewrites_samples_under_their_step(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    validation = {"sample_prompts": ["aoi_cf, smiling"], "sample_steps": 2}
    train = resume_config(tmp_path, validation=validation)
    candidate = train.candidates[0]
    reference = tmp_path / "reference"
    train_candidate(
        base_dir, dataset_dir, candidate, train, 64, 5, reference / "out",
        state_dir=reference / "state",
    )  # fmt: skip
    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        train_candidate(
            base_dir, dataset_dir, candidate, train, 64, 5, resumed / "out",
            on_step=_crash_at(3), state_dir=resumed / "state",
        )  # fmt: skip
    shutil.rmtree(resumed / "out")  # as `dvc repro` does before running the stage again
    train_candidate(
        base_dir, dataset_dir, candidate, train, 64, 5, resumed / "out",
        state_dir=resumed / "state",
    )  # fmt: skip
    expected = _files(reference / "out")
    assert any(name.startswith("samples/step-000002/") for name in expected)
    assert _files(resumed / "out") == expected
