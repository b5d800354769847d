"""The evaluation sweep on Ray (the candidate grid: ray_grid.py).

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
import time
from dataclasses import dataclass, field
from typing import Any

from charaforge.config.resources import RayConfig
from charaforge.distributed.cluster import connect
from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.sweep import SweepJob, SweepWork

log = logging.getLogger(__name__)


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
    startup_seconds: float = 0.0  # starting the actors (each loads the base model)

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
        started = time.perf_counter()
        try:
            self.worker_pids = ray.get([actor.pid.remote() for actor in actors])
            self.startup_seconds = time.perf_counter() - started  # processes up, engines loaded
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
