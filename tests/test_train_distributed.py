"""Training in 2 CPU processes (`accelerate launch --multi_gpu --num_processes 2`: torchrun, gloo;
accelerate's `--cpu` starts one process whatever the count) against 1 process.

One slow test, three real launches of the train stage: an uninterrupted 2-process run (launched
by `accelerate launch` directly, MLflow on); a 2-process run started as `python -m stages.train`
(which launches itself, train.processes=2) and SIGKILLed with its whole process group, launcher
included, between checkpoints; its resume. Against an in-process 1-process run with the same
global batch (2 x the per-process batch) it checks: the ranks trained on disjoint halves of
exactly the 1-process batches, the LoRA agrees to float rounding, the learning rates are equal,
every output is written once, and the killed-and-resumed run has the uninterrupted run's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stand_in_params_dict
from safetensors.torch import load_file
from test_models_train import make_dataset, tiny_train

from charaforge.errors import ConfigError
from charaforge.train import RunContext, train_all
from charaforge.train.launch import check_devices, launch_command
from charaforge.train.processes import SAMPLE_LOG_ENV
from charaforge.train.resume_state import KILL_ENV, KILL_GROUP_ENV, saved_states

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "r4/checkpoint-4/pytorch_lora_weights.safetensors"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def dataset8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 training images, global batch 4: two batches an epoch, so the order matters.
    return make_dataset(tmp_path_factory.mktemp("dataset8") / "dataset", train_images=8)


def distributed_config(processes: int, tmp: Path):
    # Linear decay (the schedule a per-process scheduler step would break), caption shuffle
    # (every caption of the global batch drawn alike on both ranks), offset noise and min-SNR.
    return tiny_train(
        batch_size=4,
        max_steps=4,
        checkpoint_every=2,
        candidates=[{"name": "r4", "rank": 4, "alpha": 4, "learning_rate": 1e-3}],
        lr_scheduler="linear",
        noise_offset=0.05,
        min_snr_gamma=5.0,
        caption={"shuffle": True, "keep_tokens": 1, "dropout": 0.0},
        cache={"latents": True, "text_encoder_outputs": False, "dir": str(tmp / "cache")},
        processes=processes,
        cpu_threads=1,
    )


def _workdir(root: Path, base_dir: Path, dataset_dir: Path, tracking: bool) -> Path:
    params = stand_in_params_dict()
    section = distributed_config(2, root).model_dump(mode="json")
    section["cache"]["dir"] = "data/cache"
    section["state_dir"] = "data/train_state"
    params["train"] = section
    params["tracking"] = {"enabled": tracking, "uri": None, "experiment": "distributed"}
    params["seed"] = 5
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    shutil.copytree(base_dir, root / "data" / "base")
    shutil.copytree(dataset_dir, root / "data" / "dataset")
    return root


def _run(workdir: Path, command: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    for hook in (KILL_ENV, KILL_GROUP_ENV, "MLFLOW_TRACKING_URI"):
        if hook not in env:
            environment.pop(hook, None)
    # Its own session: the kill hook SIGKILLs the whole group (launcher and ranks), as a
    # scheduler ending the job would, and nothing outside it.
    return subprocess.run(
        command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=900,
        start_new_session=True,
    )  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _sample_log(folder: Path, rank: int) -> dict[int, list[str]]:
    lines = (folder / f"rank-{rank}.jsonl").read_text(encoding="utf-8").splitlines()
    return {entry["step"]: entry["samples"] for entry in map(json.loads, lines)}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch(
    base_dir: Path, dataset8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 process, global batch 4, in-process (the reference the 2 ranks must reproduce).
    single_log = tmp_path / "single_log"
    monkeypatch.setenv(SAMPLE_LOG_ENV, str(single_log))
    single = tmp_path / "single"
    train_all(
        base_dir, dataset8, distributed_config(1, tmp_path), 64, 5, single / "train",
        single / "plots", trigger="aoi_cf", state_dir=single / "state",
        context=RunContext(trigger="aoi_cf", git_commit="unknown"),
    )  # fmt: skip
    monkeypatch.delenv(SAMPLE_LOG_ENV)

    # 2 processes, uninterrupted: `accelerate launch` of the stage, MLflow on.
    reference = _workdir(tmp_path / "reference", base_dir, dataset8, tracking=True)
    ranks_log = tmp_path / "ranks_log"
    launched = _run(
        reference,
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
         "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "stages.train"],
        **{SAMPLE_LOG_ENV: str(ranks_log)},
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]

    # Disjoint shares of exactly the 1-process batches, every step.
    single_batches = _sample_log(single_log, 0)
    rank0, rank1 = _sample_log(ranks_log, 0), _sample_log(ranks_log, 1)
    assert sorted(single_batches) == sorted(rank0) == sorted(rank1) == [1, 2, 3, 4]
    for step, batch in single_batches.items():
        assert len(rank0[step]) == len(rank1[step]) == 2
        assert not set(rank0[step]) & set(rank1[step])
        assert rank0[step] + rank1[step] == batch

    # The LoRA agrees to float rounding (DDP's averaged gradient vs the batch mean's).
    two = load_file(str(reference / "data" / "train" / WEIGHTS))
    one = load_file(str(single / "train" / WEIGHTS))
    assert two.keys() == one.keys()
    max_difference = max(float((two[k] - one[k]).abs().max()) for k in one)
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)
    print(f"max |LoRA(2 processes) - LoRA(1 process)| = {max_difference:.3e}")
    assert moved > 1e-4  # it trained (lora_B starts at zero)
    assert max_difference < 1e-5
    history = (reference / "data" / "train" / "r4" / "history.csv").read_text()
    single_history = (single / "train" / "r4" / "history.csv").read_text()
    lr = [line.split(",")[2] for line in history.splitlines()]
    assert lr == [line.split(",")[2] for line in single_history.splitlines()]
    assert lr[1:] == ["0.00075", "0.0005", "0.00025", "0.0"]  # linear over 4 steps, once a step

    # One writer: one checkpoint log line each, one MLflow run with its metrics.
    assert launched.stderr.count("saved checkpoint-2") == 1
    assert launched.stderr.count("saved checkpoint-4") == 1
    with sqlite3.connect(reference / "mlflow.db") as db:
        runs = db.execute("select name from runs order by name").fetchall()
        losses = db.execute("select count(*) from metrics where key = 'loss'").fetchone()
    # The stage's run and the candidate's nested run (pipeline.tracking), once each.
    assert runs == [("r4 · aoi",), ("train · aoi · workspace",)]
    assert losses == (4,)

    # Killed (launcher and ranks, SIGKILL) after step 3, between checkpoints; resumed.
    resumed = _workdir(tmp_path / "resumed", base_dir, dataset8, tracking=False)
    stage = [sys.executable, "-m", "stages.train"]  # train.processes=2: it launches itself
    killed = _run(resumed, stage, **{KILL_ENV: "step:3", KILL_GROUP_ENV: "1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [s.step for s in saved_states(resumed / "data" / "train_state" / "r4")] == [2]
    shutil.rmtree(resumed / "data" / "train", ignore_errors=True)  # DVC clears its outputs
    finished = _run(resumed, stage)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming from step 2" in finished.stderr
    produced = _files(resumed / "data" / "train")
    assert WEIGHTS in produced
    assert produced == _files(reference / "data" / "train")


def test_more_gpus_than_exist_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.processes: 4 processes asked for.*2 GPU"):
        check_devices(tiny_train(batch_size=4, processes=4), available=2)
    with pytest.raises(ConfigError, match=r"train\.devices: GPU\(s\) \[1\].*has 1 GPU"):
        check_devices(tiny_train(processes=2, devices=[0, 1]), available=1)
    assert check_devices(tiny_train(processes=2), available=0) is None  # CPU processes
    assert check_devices(tiny_train(processes=2, devices=[3, 1]), available=4) == [3, 1]
    assert torch.cuda.device_count() == 0 or check_devices(tiny_train()) == [0]


def test_global_batch_must_split_over_the_processes() -> None:
    with pytest.raises(ValueError, match="does not split evenly over train.processes=3"):
        tiny_train(batch_size=4, processes=3)


def test_each_launch_takes_a_port_that_is_free_now() -> None:
    """Single-machine launches name their own rendezvous port, one the kernel has free, not
    torchrun's fixed 29500: two launches on one machine (two tests on two xdist workers, two
    trainings) do not take each other's port."""
    import socket

    train = tiny_train().model_copy(update={"processes": 2})
    command = launch_command(train, "stages.train", None)
    port = int(command[command.index("--main_process_port") + 1])
    assert port != 29500
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # free: nothing listens there
