"""The candidate grid and the evaluation sweep on Ray.

`connect` starts an embedded local Ray (`ray.num_cpus`) or joins a cluster (`ray.address`, or
the RAY_ADDRESS environment variable: "auto", "ray://head:10001", "host:6379"). Each candidate
trains as one task asking for `ray.gpus_per_task` GPUs (one candidate per GPU, any node); the
sweep's work items are dealt by whole cells to `eval.workers` engine actors. A task or actor
whose process dies is retried (`ray.max_retries`): training resumes from its latest saved state,
the sweep renders only the images not yet on disk (each written atomically), so a retry leaves
no half-written file and redoes nothing finished. The driver merges in plan order: summary.json,
the loss curves, index.parquet and the grids are those of the sequential run.

Paths are the driver's: actors and tasks work in the driver's directory (a cluster needs the
repository on a shared filesystem at the same path on every node).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charaforge.config import TrainConfig
from charaforge.config.resources import RayConfig
from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.sweep import SweepJob, SweepWork
from charaforge.models.base import read_base_info, set_cpu_threads
from charaforge.train.grid import train_candidate, write_grid_outputs
from charaforge.train.settings import RunContext
from charaforge.train.trainer import TrainResult

log = logging.getLogger(__name__)


def connect(config: RayConfig) -> Any:
    """Join the configured cluster, or start an embedded local Ray once per process."""
    import ray

    if ray.is_initialized():
        return ray
    address = config.address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=config.num_cpus, num_gpus=config.num_gpus, **options)
    return ray


class SweepWorker:
    """One engine per worker process: the base model loaded once, LoRAs loaded per cell."""

    def __init__(self, cwd: str, base_dir: str, engine_options: dict[str, Any]) -> None:
        os.chdir(cwd)
        self.engine = GenerationEngine(base_dir, **engine_options)

    def pid(self) -> int:
        return os.getpid()

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        return sweep.render_jobs(self.engine, jobs, work)


@dataclass
class RaySweepExecutor:
    """The sweep's work items on `workers` engine actors (see the module docstring)."""

    config: RayConfig
    workers: int
    base_dir: str
    engine_options: dict[str, Any]
    worker_pids: list[int] = field(default_factory=list)  # filled once the actors are up

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        ray = connect(self.config)
        shares = [share for share in sweep.shard_by_cell(jobs, self.workers) if share]
        actor_class = ray.remote(
            num_cpus=1,
            num_gpus=self.config.gpus_per_task,
            max_restarts=self.config.max_retries,
            max_task_retries=self.config.max_retries,
        )(SweepWorker)
        actors = [
            actor_class.remote(os.getcwd(), self.base_dir, self.engine_options) for _ in shares
        ]
        try:
            self.worker_pids = ray.get([actor.pid.remote() for actor in actors])
            pending = [
                actor.render.remote(share, work)
                for actor, share in zip(actors, shares, strict=True)
            ]
            counts = ray.get(pending)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
        log.info("sweep: %d work items on %d Ray worker(s)", len(jobs), len(shares))
        return sum(c[0] for c in counts), sum(c[1] for c in counts)


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
