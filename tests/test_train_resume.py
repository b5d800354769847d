"""Exact resume: a training run stopped at any step and resumed ends with the very bytes of an
uninterrupted run (LoRA files, loss history), on CPU.

The fast test stops the run in-process (an exception from the step callback, as a crash would);
the slow one SIGKILLs a real `python -m stages.train` process at several points, including
halfway through writing a checkpoint, and resumes it each time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import stand_in_params_dict
from test_models_train import tiny_train

from charaforge.train import RunContext, train_all, train_candidate
from charaforge.train.resume_state import KILL_ENV, saved_states

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The trainer's default state and cache folders are relative (data/...): keep them here.
    monkeypatch.chdir(tmp_path)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Crash(RuntimeError):
    pass


def _crash_at(step_to_crash: int):
    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step == step_to_crash:
            raise Crash(f"stopped at step {step}")

    return on_step


# Dropout, caption shuffle and dropout, gradient accumulation, warm-up and a cosine schedule
# and noise offset: every random draw and every piece of state a resume must restore.
def resume_config(tmp: Path, **extra):
    return tiny_train(
        max_steps=4,
        checkpoint_every=2,
        # One thread in the stage process and in the reference: torch's default (the core count)
        # sums the loss in blocks that differ between a loaded and an idle run (seen once in the
        # full suite: the same weights, the logged loss 1e-7 apart).
        cpu_threads=1,
        candidates=[{"name": "r4", "rank": 4, "alpha": 2, "learning_rate": 1e-3}],
        lora_dropout=0.1,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        noise_offset=0.05,
        min_snr_gamma=5.0,
        caption={"shuffle": True, "keep_tokens": 1, "dropout": 0.2},
        cache={"latents": True, "text_encoder_outputs": False, "dir": str(tmp / "cache")},
        **extra,
    )


def test_stopped_and_resumed_run_is_bit_identical(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    train = resume_config(tmp_path)
    candidate = train.candidates[0]
    reference = tmp_path / "reference"
    train_candidate(
        base_dir, dataset_dir, candidate, train, 64, 5, reference / "out",
        state_dir=reference / "state",
    )  # fmt: skip

    resumed = tmp_path / "resumed"
    # Stop between checkpoints (step 3), then at a checkpoint step before it is saved (step 4).
    for stop in (3, 4):
        with pytest.raises(Crash):
            train_candidate(
                base_dir, dataset_dir, candidate, train, 64, 5, resumed / "out",
                on_step=_crash_at(stop), state_dir=resumed / "state",
            )  # fmt: skip
    assert [state.step for state in saved_states(resumed / "state")] == [2]
    # The outputs are cleared as DVC would; the exports come back from the saved states.
    shutil.rmtree(resumed / "out")
    result = train_candidate(
        base_dir, dataset_dir, candidate, train, 64, 5, resumed / "out",
        state_dir=resumed / "state",
    )  # fmt: skip
    assert result.resumed_from == 2
    assert result.history["step"].tolist() == [1, 2, 3, 4]
    assert _files(resumed / "out") == _files(reference / "out")
    assert "checkpoint-4/r4-000004.safetensors" in _files(reference / "out")


def test_state_of_a_different_configuration_is_not_resumed(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    train = tiny_train(
        max_steps=2,
        checkpoint_every=1,
        candidates=[{"name": "r4", "rank": 4, "alpha": 4, "learning_rate": 1e-3}],
    )
    candidate = train.candidates[0]
    with pytest.raises(Crash):
        train_candidate(
            base_dir, dataset_dir, candidate, train, 64, 5, tmp_path / "out",
            on_step=_crash_at(2), state_dir=tmp_path / "state",
        )  # fmt: skip
    other = candidate.model_copy(update={"learning_rate": 5e-4})
    result = train_candidate(
        base_dir, dataset_dir, other, train, 64, 5, tmp_path / "out", state_dir=tmp_path / "state"
    )
    assert result.resumed_from == 0


def _stage_workdir(root: Path, base_dir: Path, dataset_dir: Path, train_section: dict) -> Path:
    """A working copy for `python -m stages.train`: params.yaml, data/base, data/dataset."""
    params = stand_in_params_dict()
    params["train"] = train_section
    params["tracking"]["enabled"] = False
    params["seed"] = 5
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    shutil.copytree(base_dir, root / "data" / "base")
    shutil.copytree(dataset_dir, root / "data" / "dataset")
    return root


def _run_stage(workdir: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "stages.train"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sigkilled_training_process_resumes_bit_identically(
    base_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    train = resume_config(tmp_path)
    section = train.model_dump(mode="json")
    section["cache"]["dir"] = "data/cache"
    section["state_dir"] = "data/train_state"
    workdir = _stage_workdir(tmp_path / "work", base_dir, dataset_dir, section)

    # Killed after step 1 (before any checkpoint), after step 3 (between checkpoints), halfway
    # through writing the state of step 4 (the last): each time a real SIGKILL.
    for kill_at, states_after in (("step:1", []), ("step:3", [2]), ("save:4", [2])):
        killed = _run_stage(workdir, kill_at)
        assert killed.returncode == -9, killed.stderr[-2000:]
        steps = [state.step for state in saved_states(workdir / "data/train_state/r4")]
        assert steps == states_after, kill_at
        shutil.rmtree(workdir / "data" / "train", ignore_errors=True)  # DVC clears its outputs
    finished = _run_stage(workdir, None)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming from step 2" in finished.stderr

    reference = tmp_path / "reference"
    train_all(
        base_dir, dataset_dir, resume_config(tmp_path / "ref"), 64, 5, reference / "train",
        reference / "plots", trigger="aoi_cf",
        state_dir=reference / "state", context=RunContext(trigger="aoi_cf", git_commit="unknown"),
    )  # fmt: skip
    produced = _files(workdir / "data" / "train")
    assert produced == _files(reference / "train")
    assert "r4/checkpoint-4/pytorch_lora_weights.safetensors" in produced
