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


@pytest.mark.slow
def test_interrupted_sweep_resumes_after_its_output_folder_is_deleted(tmp_path: Path) -> None:
    from engine_fixtures import make_workspace

    from charaforge.config import EvalConfig
    from charaforge.generate.engine import GenerationEngine
    from charaforge.generate.sweep import run_sweep

    workspace = make_workspace(tmp_path / "ws", max_steps=2)
    engine = GenerationEngine(workspace / "base", device="cpu")
    evaluation = EvalConfig(
        prompts=["{trigger}, portrait", "{trigger}, smiling"], seeds=[0, 1],
        lora_scales=[0.0, 1.0], steps=2, guidance_scale=4.0, scheduler="euler_a", batch_size=2,
    )  # fmt: skip
    done: list[str] = []

    def interrupt(job: object) -> None:
        done.append(job.relative_path())
        if len(done) == 3:
            raise KeyboardInterrupt  # as if the stage were killed mid-sweep

    out, work = tmp_path / "generate", tmp_path / "generate_work"
    args = (engine, workspace / "train", evaluation, "aoi_cf", 64, 7, out)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(*args, on_image=interrupt, work_dir=work)
    shutil.rmtree(out)  # `dvc repro` deletes the stage's output before running it again
    resumed = run_sweep(*args, work_dir=work)
    assert (resumed.rendered, resumed.skipped) == (5, 3)
    assert not work.exists()  # complete: the work folder is gone
    reference = run_sweep(*args[:-1], tmp_path / "reference")
    assert list(resumed.index["image_id"]) == list(reference.index["image_id"])
    images = sorted(p.relative_to(out) for p in out.rglob("*.png") if "grids" not in p.parts)
    for name in images:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
