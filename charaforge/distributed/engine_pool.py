"""Kept engine actors on Ray: started once per driver process, reused by every sweep and batch
job after them.

Starting an engine actor is the expensive part of a Ray sweep: a fresh Python process imports
torch and diffusers and loads the base model (13.8 of the 24.0 s of a 54-image stand-in sweep,
measured by benchmarks/bench_distributed.py before this pool existed). A kept pool pays that
once: `start` launches the actors without waiting (the driver goes on loading its own things in
the meantime), `ready` waits for them, and later sweeps find them warm. Each actor asks Ray for
one CPU (and `ray.gpus_per_task` GPUs) for as long as it lives, so whatever else needs those
resources in the same driver (the candidate grid's training tasks) calls `release_pools` first.

Actors leave their engine as they found it (a sweep ends by unloading its LoRAs; batch
rows keep at most a few on-demand LoRAs), so a warm actor renders the bytes of a fresh one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charaforge.config.resources import RayConfig
from charaforge.distributed.cluster import connect
from charaforge.distributed.pools import KEPT, release_pools
from charaforge.generate import sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.sweep import SweepJob, SweepWork
from charaforge.models.base import pipeline_class, read_base_info

log = logging.getLogger(__name__)

# When this module finished importing (torch and the engine's own modules): in an actor's
# process, the end of the start-up's first part (EngineActor.start_times).
MODULE_IMPORTED_AT = time.time()

# Packages that diffusers and transformers import only because they are installed. An engine
# renders a float32 pipeline and never quantizes, and importing bitsandbytes compiles its kernels
# (its `torch.compile` decorators import torch._inductor): about 1.4 of the ~9 CPU seconds an
# actor's start-up took (benchmarks/bench_distributed.py). The trainer's 8-bit AdamW runs in
# training processes, never in an engine actor's.
UNUSED_BY_ENGINE_ACTORS = ("bitsandbytes",)


def skip_unused_imports() -> list[str]:
    """Hide UNUSED_BY_ENGINE_ACTORS from this process (a `None` in sys.modules: find_spec says
    absent, import raises ImportError), so diffusers and transformers leave them out. Only
    before diffusers is imported (it decides once, at import) and only for a package not yet
    imported: a process that already uses it keeps it. Returns the names hidden."""
    if "diffusers" in sys.modules:
        return []
    hidden = [name for name in UNUSED_BY_ENGINE_ACTORS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    return hidden


class EngineActor:
    """One engine per actor process: the base model loaded once, LoRAs loaded per cell."""

    def __init__(self, cwd: str, base_dir: str, engine_options: dict[str, Any]) -> None:
        import psutil  # a Ray dependency

        # Where an actor's start-up goes (benchmarks/bench_distributed.py prints it): the
        # process's start (a worker Ray prestarted at `ray.init` is older than the actor), this
        # module's imports, diffusers' and transformers', the pipeline's load.
        started = time.time()
        self.hidden_modules = skip_unused_imports()
        os.chdir(cwd)
        pipeline_class(read_base_info(base_dir).family)  # diffusers, transformers: timed apart
        libraries = time.time()
        self.engine = GenerationEngine(base_dir, **engine_options)
        self.started = {
            "process": psutil.Process().create_time(),
            "imported": MODULE_IMPORTED_AT,
            "init": started,
            "libraries": libraries,
            "loaded": time.time(),
            "cpu": time.process_time(),  # the CPU seconds it took (whatever the load)
        }
        self.images = 0  # rendered by this actor since it started (observable by tests)
        self.busy_seconds = 0.0  # inside render_unit since it started
        self.current_sweep: SweepWork | None = None  # whose LoRA the engine may hold (render_unit)

    def pid(self) -> int:
        return os.getpid()

    def start_times(self) -> dict[str, float]:
        """Wall-clock times (time.time()) of the process's start, this module imported (torch,
        the engine's modules), the actor's __init__ entered, diffusers and transformers
        imported, the engine loaded (the base pipeline from its saved folder); and "cpu", the
        process's CPU seconds by then."""
        return self.started

    def imported(self, names: list[str]) -> dict[str, bool]:
        """Which of these modules this actor's process has imported (tests: skip_unused_imports)."""
        return {name: sys.modules.get(name) is not None for name in names}

    def rendered(self) -> int:
        return self.images

    def busy(self) -> dict[str, float]:
        """Images rendered, seconds spent in sweep units and this process's CPU seconds so far
        (benchmarks/bench_distributed.py: how much of the wall time each worker worked and how
        much CPU it got), and its torch thread count (1 by eval.cpu_threads)."""
        import torch

        return {
            "images": self.images,
            "busy": self.busy_seconds,
            "cpu": time.process_time(),
            "torch_threads": torch.get_num_threads(),
        }

    def render_unit(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        """One work unit (sweep_units); the unit's LoRA stays loaded for the next one of the
        same sweep (`end_sweep` releases it)."""
        started = time.perf_counter()
        if work != self.current_sweep:  # a LoRA of another sweep may share a name, not the file
            self.end_sweep()
            self.current_sweep = work
        counts = sweep.render_jobs(self.engine, jobs, work, keep_lora=True)
        self.images += counts[0]
        self.busy_seconds += time.perf_counter() - started
        return counts

    def end_sweep(self) -> None:
        """Unload the sweep's LoRAs: the engine as a fresh actor's."""
        for name in list(self.engine.loras):
            self.engine.unload_lora(name)
        self.current_sweep = None


@dataclass
class EnginePool:
    """Engine actors of one configuration, grown on demand and kept until `shutdown`."""

    config: RayConfig
    base_dir: str
    engine_options: dict[str, Any]
    actor_class: type = EngineActor
    actors: list[Any] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # of the actors, once `ready` has seen them
    job_id: str = ""  # the Ray driver job the actors belong to (a new `ray.init` loses them)

    def start(self, workers: int) -> None:
        """Launch actors until there are `workers` of them; returns at once."""
        ray = connect(self.config)
        self.job_id = _session(ray)
        remote_class = ray.remote(
            num_cpus=1,
            num_gpus=self.config.gpus_per_task,
            max_restarts=self.config.max_retries,
            max_task_retries=self.config.max_retries,
        )(self.actor_class)
        while len(self.actors) < workers:
            self.actors.append(remote_class.remote(os.getcwd(), self.base_dir, self.engine_options))

    def ready(self, workers: int) -> tuple[list[Any], float]:
        """The first `workers` actors, started if need be and waited for; and the seconds this
        call spent waiting for actors to start (0.0 when all were warm)."""
        ray = connect(self.config)
        self.start(workers)
        if len(self.pids) >= workers:
            return self.actors[:workers], 0.0
        waited_from = time.perf_counter()
        self.pids = ray.get([actor.pid.remote() for actor in self.actors])
        return self.actors[:workers], time.perf_counter() - waited_from

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        self.actors, self.pids = [], []


def _session(ray: Any) -> str:
    """This driver's Ray session: a job id alone repeats after `ray.shutdown()` and a new
    embedded `ray.init()` (both are job 01000000), the driver's node id does not."""
    context = ray.get_runtime_context()
    return f"{context.get_node_id()}/{context.get_job_id()}"


def _key(config: RayConfig, base_dir: str, options: dict[str, Any], actor_class: type) -> tuple:
    return (
        config.model_dump_json(),
        str(Path(base_dir).resolve()),
        repr(sorted(options.items())),
        f"{actor_class.__module__}.{actor_class.__qualname__}",
        os.getcwd(),
    )


def kept_pool(
    config: RayConfig,
    base_dir: str | Path,
    engine_options: dict[str, Any],
    actor_class: type = EngineActor,
) -> EnginePool:
    """This process's pool for that configuration: the kept one, or a new one (the pools of
    other configurations are shut down first: their actors hold the CPUs and GPUs)."""
    import ray

    key = _key(config, str(base_dir), engine_options, actor_class)
    pool = KEPT.get(key)  # an EnginePool
    current_job = _session(ray) if ray.is_initialized() else None
    if pool is not None and pool.job_id == current_job:
        return pool
    release_pools()
    pool = EnginePool(config, str(base_dir), dict(engine_options), actor_class)
    KEPT[key] = pool
    return pool
