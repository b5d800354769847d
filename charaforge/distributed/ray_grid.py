"""The candidate grid on Ray: each candidate one task asking for `ray.gpus_per_task` GPUs (one
candidate per GPU, any node). A task whose process dies is retried (`ray.max_retries`) and
resumes from the candidate's latest saved state. The driver writes summary.json and the loss
curves in candidate order: the files of `train_all`. Tasks work in the driver's directory (a
cluster needs the repository on a shared filesystem at the same path on every node)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from charaforge.config import TrainConfig
from charaforge.config.resources import RayConfig
from charaforge.distributed.cluster import connect
from charaforge.distributed.pools import release_pools
from charaforge.models.base import read_base_info, set_cpu_threads
from charaforge.train.grid import train_candidate, write_grid_outputs
from charaforge.train.settings import RunContext
from charaforge.train.trainer import TrainResult


def _train_one(cwd: str, arguments: dict[str, Any]) -> TrainResult:
    os.chdir(cwd)
    set_cpu_threads(arguments["train"].cpu_threads)
    return train_candidate(**arguments)


def train_grid(
    config: RayConfig,
    base_dir: str | Path,
    dataset_dir: str | Path,
    train: TrainConfig,
    resolution: int,
    seed: int,
    out_dir: str | Path,
    plots_dir: str | Path,
    context: RunContext,
    state_dir: str | Path | None = None,
) -> list[TrainResult]:
    """Every candidate as one Ray task, in parallel; the grid's outputs written here, in
    candidate order, as `train_all` writes them."""
    ray = connect(config)
    release_pools()  # kept engine actors would hold the CPUs and GPUs the tasks need
    task = ray.remote(num_cpus=1, num_gpus=config.gpus_per_task, max_retries=config.max_retries)(
        _train_one
    )
    state_root = Path(state_dir) if state_dir else Path(train.state_dir)
    refs = [
        task.remote(
            os.getcwd(),
            {
                "base_dir": base_dir,
                "dataset_dir": dataset_dir,
                "candidate": candidate,
                "train": train,
                "resolution": resolution,
                "seed": seed,
                "out_dir": Path(out_dir) / candidate.name,
                "trigger": context.trigger,
                "state_dir": state_root / candidate.name,
                "context": context,
            },
        )  # fmt: skip
        for candidate in train.candidates
    ]
    results = ray.get(refs)
    write_grid_outputs(results, read_base_info(base_dir).stand_in, out_dir, plots_dir)
    return results
