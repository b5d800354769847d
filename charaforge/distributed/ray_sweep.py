"""The evaluation sweep on Ray (the candidate grid: ray_grid.py).

`connect` starts an embedded local Ray (`ray.num_cpus`) or joins a cluster (`ray.address`, or
the RAY_ADDRESS environment variable: "auto", "ray://head:10001", "host:6379"). Each candidate
trains as one task asking for `ray.gpus_per_task` GPUs (one candidate per GPU, any node); the
sweep's work items run on `eval.workers` engine actors, kept for the next sweep of the same
process (engine_pool.py: started once, not per sweep). The items are cut into units of whole
batches (sweep_units.py) and every actor pulls its next unit as soon as it is free, preferring
the checkpoint it already holds: a slower or busier worker takes fewer units, and no worker
waits at the end for an uneven share of whole cells. A task or actor whose process dies is
retried (`ray.max_retries`): training resumes from its latest saved state, the sweep renders
only the images not yet on disk (each written atomically), so a retry leaves no half-written
file and redoes nothing finished. The driver merges in plan order: summary.json, the loss
curves, index.parquet and the grids are those of the sequential run.

Paths are the driver's: actors and tasks work in the driver's directory (a cluster needs the
repository on a shared filesystem at the same path on every node).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charaforge.config.resources import RayConfig
from charaforge.distributed.cluster import connect
from charaforge.distributed.engine_pool import EngineActor, kept_pool
from charaforge.distributed.pools import release_pools
from charaforge.generate import sweep_units
from charaforge.generate.sweep import SweepJob, SweepWork

log = logging.getLogger(__name__)


@dataclass
class RaySweepExecutor:
    """The sweep's work items on `workers` kept engine actors (see the module docstring)."""

    config: RayConfig
    workers: int
    base_dir: str
    engine_options: dict[str, Any]
    actor_class: type = EngineActor
    worker_pids: list[int] = field(default_factory=list)  # filled once the actors are up
    # The seconds the last `render` waited for actors to start (0.0 when the pool was warm).
    startup_seconds: float = 0.0
    # Units each actor rendered in the last `render` (by actor index; for tests and benchmarks).
    units_done: list[int] = field(default_factory=list)

    def pool(self) -> Any:
        return kept_pool(self.config, self.base_dir, self.engine_options, self.actor_class)

    def start(self) -> None:
        """Launch the actors now, without waiting (they load the base model meanwhile)."""
        self.pool().start(self.workers)

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        ray = connect(self.config)
        pool = self.pool()
        try:
            actors, self.startup_seconds = pool.ready(self.workers)
            self.worker_pids = pool.pids[: self.workers]
            counts = self._dispatch(ray, actors, jobs, work)
            _remove_stale_temps(Path(work.out_dir))
        except BaseException:
            release_pools()  # an actor out of restarts: the next sweep starts afresh
            raise
        log.info("sweep: %d work items on %d Ray worker(s)", len(jobs), len(actors))
        return counts

    def _dispatch(
        self, ray: Any, actors: list[Any], jobs: list[SweepJob], work: SweepWork
    ) -> tuple[int, int]:
        """Every unit to the next free actor (sweep_units.next_unit); (rendered, skipped)."""
        units = sweep_units.work_units(jobs, work.eval, len(actors))
        loras = [sweep_units.unit_lora(unit) for unit in units]
        pending = list(range(len(units)))
        work_ref = ray.put(work)  # once, not with every unit
        held: list[sweep_units.LoraKey] = [None] * len(actors)
        running: dict[Any, int] = {}  # object ref -> actor index
        free = list(range(len(actors)))
        self.units_done = [0] * len(actors)
        totals = [0, 0]
        while pending or running:
            while free and pending:
                actor = free.pop(0)
                others = {held[i] for i in range(len(actors)) if i != actor} - {None}
                unit = sweep_units.next_unit(pending, loras, held[actor], others)
                pending.remove(unit)
                held[actor] = loras[unit]
                ref = actors[actor].render_unit.remote(units[unit], work_ref)
                running[ref] = actor
            [finished], _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(finished)
            rendered, skipped = ray.get(finished)
            totals[0] += rendered
            totals[1] += skipped
            self.units_done[actor] += 1
            free.append(actor)
        ray.get([actor.end_sweep.remote() for actor in actors])
        return totals[0], totals[1]


# core/files.atomic_path's temporary folder: "." + the file's name + "." + 8 random characters.
_TEMP_FOLDER = re.compile(r"\..+\.[a-z0-9_]{8}")


def _remove_stale_temps(out_dir: Path) -> None:
    """The temporary folders that a SIGKILLed actor left mid-write (its retry wrote the image
    again). Only once every unit is done: then no live actor writes there."""
    images = out_dir / "images"
    if not images.is_dir():
        return
    for folder in sorted(images.rglob(".*")):
        if _TEMP_FOLDER.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
