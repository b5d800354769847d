"""The evaluation sweep on Ray (the candidate grid: ray_grid.py).

`connect` starts an embedded local Ray (`ray.num_cpus`) or joins a cluster (`ray.address`, or
the RAY_ADDRESS environment variable: "auto", "ray://head:10001", "host:6379"). Each candidate
trains as one task asking for `ray.gpus_per_task` GPUs (one candidate per GPU, any node); the
sweep's work items are dealt by whole cells to `eval.workers` engine actors, kept for the next
sweep of the same process (engine_pool.py: started once, not per sweep). A task or actor
whose process dies is retried (`ray.max_retries`): training resumes from its latest saved state,
the sweep renders only the images not yet on disk (each written atomically), so a retry leaves
no half-written file and redoes nothing finished. The driver merges in plan order: summary.json,
the loss curves, index.parquet and the grids are those of the sequential run.

Paths are the driver's: actors and tasks work in the driver's directory (a cluster needs the
repository on a shared filesystem at the same path on every node).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from charaforge.config.resources import RayConfig
from charaforge.distributed.cluster import connect
from charaforge.distributed.engine_pool import kept_pool
from charaforge.distributed.pools import release_pools
from charaforge.generate import sweep
from charaforge.generate.sweep import SweepJob, SweepWork

log = logging.getLogger(__name__)


@dataclass
class RaySweepExecutor:
    """The sweep's work items on `workers` kept engine actors (see the module docstring)."""

    config: RayConfig
    workers: int
    base_dir: str
    engine_options: dict[str, Any]
    worker_pids: list[int] = field(default_factory=list)  # filled once the actors are up
    # The seconds the last `render` waited for actors to start (0.0 when the pool was warm).
    startup_seconds: float = 0.0

    def start(self) -> None:
        """Launch the actors now, without waiting (they load the base model meanwhile)."""
        kept_pool(self.config, self.base_dir, self.engine_options).start(self.workers)

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        ray = connect(self.config)
        shares = [share for share in sweep.shard_by_cell(jobs, self.workers) if share]
        pool = kept_pool(self.config, self.base_dir, self.engine_options)
        try:
            actors, self.startup_seconds = pool.ready(self.workers)
            self.worker_pids = pool.pids[: self.workers]
            pending = [
                actor.render_sweep.remote(share, work)
                for actor, share in zip(actors, shares, strict=False)
            ]
            counts = ray.get(pending)
        except BaseException:
            release_pools()  # an actor out of restarts: the next sweep starts afresh
            raise
        log.info("sweep: %d work items on %d Ray worker(s)", len(jobs), len(shares))
        return sum(c[0] for c in counts), sum(c[1] for c in counts)
