"""The sweep on Ray: images/s with 1 and 2 engine actors, and the Ray path's overhead at 1 actor
against the in-process sweep, all measured in the same run (ratios, not absolute speeds).

Targets: 2 workers >= 1.6x one worker (on 2 free cores), Ray at 1 worker < 10% slower than in
process. Two parts, every number printed with the load average before and after it:

- small (54 images, `--rounds` rounds interleaving in-process, 1 actor, 2 actors, so a burst
  of load from elsewhere hits them alike): per Ray path and round, end to end (a cold pool:
  new actor processes, imports, base model, then the sweep) and steady (the same sweep again on
  the now warm pool, the kept pool of distributed/engine_pool.py: what every later sweep of a
  process gets);
- large (`--images`, default 675, the size of the world demo's 680-image sweep): one round of
  each path end to end: in process (the engine's load, then the sweep), 1 actor and 2 actors
  (their start-up, then the sweep), so the start-up weighs what it weighs in a real stage.

Beside the wall time, each actor reports where its start-up went (waiting for a worker process,
importing torch and the engine's modules, importing diffusers and transformers, loading the
pipeline) with its CPU seconds, and over each sweep the CPU seconds it got and the seconds it
spent rendering: CPU seconds per image per worker do not depend on the load, so a 2-worker ratio
depressed by a busy machine can be told apart from one the code loses. Every sweep renders into
a fresh folder and its images must be byte-identical to the in-process ones. Stand-in models
(random weights, 64 px).

    .venv/bin/python benchmarks/bench_distributed.py [--images 675] [--rounds 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import torch  # noqa: E402
from bench_sweep import build_workspace  # noqa: E402

from charaforge.config import EvalConfig  # noqa: E402
from charaforge.config.resources import RayConfig  # noqa: E402
from charaforge.distributed.cluster import connect  # noqa: E402
from charaforge.distributed.engine_pool import EngineActor  # noqa: E402
from charaforge.distributed.pools import release_pools  # noqa: E402
from charaforge.distributed.ray_sweep import RaySweepExecutor  # noqa: E402
from charaforge.generate.engine import GenerationEngine  # noqa: E402
from charaforge.generate.sweep import plan_jobs, read_candidates, run_sweep  # noqa: E402

OPTIONS = {"scheduler": "euler", "controlnets": {}, "cpu_threads": 1}
PROMPTS = ["t, standing", "t, sitting", "t, arms up"]


class OwnSessionActor(EngineActor):
    """Diagnostic (--own-sessions): an actor in a session of its own, so Linux's autogroup
    gives it its own CPU share, as a kernel without autogroup, or another machine, would."""

    def __init__(self, *args: object) -> None:
        os.setsid()
        super().__init__(*args)


def _images(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((folder / "images").rglob("*.png"))
    }


def _load() -> float:
    return os.getloadavg()[0]


def _evaluation(steps: int, seeds: int) -> EvalConfig:
    return EvalConfig(prompts=PROMPTS, negative_prompt="lowres", seeds=list(range(seeds)),
                      lora_scales=[0.0, 0.5, 1.0], steps=steps, guidance_scale=5.0,
                      scheduler="euler", batch_size=4, cpu_threads=1)  # fmt: skip


class Bench:
    def __init__(self, root: Path, evaluation: EvalConfig) -> None:
        self.root, self.evaluation = root, evaluation
        self.reference: dict[str, str] | None = None
        self.images = 0
        self.merge_seconds: list[float] = []

    def sweep(self, engine: GenerationEngine | None, executor: RaySweepExecutor | None) -> float:
        out = Path(tempfile.mkdtemp(dir=self.root, prefix="out-"))
        started = time.perf_counter()
        result = run_sweep(engine, self.root / "train", self.evaluation, "t", 64, 1234, out,
                           executor=executor, stand_in=True)  # fmt: skip
        seconds = time.perf_counter() - started
        images = _images(out)
        self.reference = self.reference or images
        assert images == self.reference, f"{out}: bytes differ from the first sweep"
        self.images = result.rendered
        # The driver's own part: the plan, index.parquet (hashing every image), the grids.
        self.merge_seconds.append(seconds - result.seconds)
        return seconds


def _busy(ray, executor: RaySweepExecutor) -> list[dict[str, float]]:
    actors, _ = executor.pool().ready(executor.workers)
    return ray.get([actor.busy.remote() for actor in actors])


def _delta(after: list[dict], before: list[dict], key: str) -> list[float]:
    return [a[key] - b[key] for a, b in zip(after, before, strict=True)]


def _startup(ray, executor: RaySweepExecutor, submitted: float) -> list[str]:
    """Each actor's start-up in parts, from its submission (a prestarted worker is older)."""
    actors, _ = executor.pool().ready(executor.workers)
    shown = []
    for times in ray.get([actor.start_times.remote() for actor in actors]):
        begun = max(times["process"], submitted)
        shown.append(
            f"process {begun - submitted:4.1f} + imports {times['imported'] - begun:4.1f} + "
            f"diffusers {times['libraries'] - times['init']:4.1f} + pipeline "
            f"{times['loaded'] - times['libraries']:4.1f} = {times['loaded'] - submitted:4.1f} s"
            f" ({times['cpu']:.1f} CPU-s)"
        )
    return shown


def cold_ray(bench: Bench, ray, config: RayConfig, workers: int, actor_class: type) -> dict:
    """A cold pool, waited for, then the sweep: (start-up, sweep, per-actor CPU and images)."""
    release_pools()  # cold: new actor processes
    load = _load()
    executor = RaySweepExecutor(config, workers, str(bench.root / "base"), OPTIONS,
                                actor_class=actor_class)  # fmt: skip
    submitted = time.time()
    started = time.perf_counter()
    executor.start()
    executor.pool().ready(workers)
    startup = time.perf_counter() - started
    before = _busy(ray, executor)
    sweep = bench.sweep(None, executor)
    after = _busy(ray, executor)
    return {"startup": startup, "sweep": sweep, "end_to_end": startup + sweep,
            "parts": _startup(ray, executor, submitted), "executor": executor,
            "cpu": _delta(after, before, "cpu"), "busy": _delta(after, before, "busy"),
            "images": _delta(after, before, "images"), "load": (load, _load())}  # fmt: skip


def _per_image(row: dict) -> str:
    return "+".join(f"{c:.1f}" for c in row["cpu"]) + " CPU-s, " + ", ".join(
        f"{cpu / max(images, 1):.3f}" for cpu, images in zip(row["cpu"], row["images"], strict=True)
    ) + " CPU-s/image per worker"  # fmt: skip


def small_rounds(bench: Bench, ray, config: RayConfig, rounds: int, actor_class: type) -> None:
    engine = GenerationEngine(bench.root / "base", **OPTIONS)
    engine.render("warm", 0, steps=1)
    rows: dict[tuple[int, str], dict] = {}
    for index in range(rounds):
        load = _load()
        local = bench.sweep(engine, None)
        rows[(index, "local")] = {"steady": local, "load": (load, _load())}
        for workers in (1, 2):
            row = cold_ray(bench, ray, config, workers, actor_class)
            executor = row["executor"]
            load = _load()
            before = _busy(ray, executor)
            row["steady"] = bench.sweep(None, executor)
            assert executor.startup_seconds == 0.0, "the kept actors were restarted"
            after = _busy(ray, executor)
            row.update(cpu=_delta(after, before, "cpu"), busy=_delta(after, before, "busy"),
                       images=_delta(after, before, "images"), units=list(executor.units_done),
                       steady_load=(load, _load()))  # fmt: skip
            rows[(index, f"ray-{workers}")] = row
    images = bench.images
    print(f"\n== small: {images} images per sweep, {rounds} interleaved rounds ==")
    for (index, path), row in rows.items():
        load = f"load {row['load'][0]:4.1f}->{row['load'][1]:4.1f}"
        if path == "local":
            print(f"round {index} local   steady {row['steady']:6.2f} s "
                  f"{images / row['steady']:5.2f} img/s  {load}")  # fmt: skip
            continue
        print(f"round {index} {path:7} end-to-end {row['end_to_end']:6.2f} s (start-up "
              f"{row['startup']:5.2f} s)  steady {row['steady']:6.2f} s "
              f"{images / row['steady']:5.2f} img/s  {load}")  # fmt: skip
        for part in row["parts"]:
            print(f"          actor start-up: {part}")
        print(
            f"          steady: {_per_image(row)}, rendering "
            f"{'+'.join(f'{b:.1f}' for b in row['busy'])} s, units {row['units']}"
        )
    for kind in ("end_to_end", "steady"):
        ratios = [rows[(i, "ray-1")][kind] / rows[(i, "ray-2")][kind] for i in range(rounds)]
        print(f"small, 2 vs 1 worker, {kind.replace('_', '-')}: rounds "
              + ", ".join(f"x{r:.2f}" for r in ratios)
              + f"; median x{statistics.median(ratios):.2f} (target >= 1.6)")  # fmt: skip
    overheads = [rows[(i, "ray-1")]["steady"] / rows[(i, "local")]["steady"] - 1
                 for i in range(rounds)]  # fmt: skip
    print("small, Ray overhead at 1 worker vs in-process (steady): "
          + ", ".join(f"{o:+.1%}" for o in overheads)
          + f"; median {statistics.median(overheads):+.1%} (target < 10%)")  # fmt: skip
    merge = bench.merge_seconds
    print(f"the driver's own part of a sweep (plan, index, grids): {min(merge):.2f}-"
          f"{max(merge):.2f} s")  # fmt: skip


def large_round(bench: Bench, ray, config: RayConfig, actor_class: type) -> None:
    """In process (a new engine, then the sweep), then 1 and 2 cold actors, end to end."""
    load = _load()
    started = time.perf_counter()
    engine = GenerationEngine(bench.root / "base", **OPTIONS)
    engine_load = time.perf_counter() - started
    local = {"startup": engine_load, "sweep": bench.sweep(engine, None), "load": (load, _load())}
    local["end_to_end"] = local["startup"] + local["sweep"]
    del engine
    rows = {"local": local}
    for workers in (1, 2):
        rows[f"ray-{workers}"] = cold_ray(bench, ray, config, workers, actor_class)
    release_pools()
    images = bench.images
    print(f"\n== large: {images} images per sweep, one round, end to end ==")
    for path, row in rows.items():
        first = "engine load" if path == "local" else "start-up"
        print(f"{path:7} end-to-end {row['end_to_end']:7.2f} s = {first} {row['startup']:5.2f} s "
              f"+ sweep {row['sweep']:7.2f} s ({images / row['sweep']:5.2f} img/s)  load "
              f"{row['load'][0]:4.1f}->{row['load'][1]:4.1f}")  # fmt: skip
        for part in row.get("parts", []):
            print(f"          actor start-up: {part}")
        if "cpu" in row:
            print(f"          sweep: {_per_image(row)}, images {row['images']}")
    one, two = rows["ray-1"], rows["ray-2"]
    print(
        f"large, 2 vs 1 worker: end-to-end x{one['end_to_end'] / two['end_to_end']:.2f}, "
        f"sweep after start-up x{one['sweep'] / two['sweep']:.2f} (target >= 1.6)"
    )
    print(f"large, Ray 1 worker vs in-process: end-to-end "
          f"{one['end_to_end'] / local['end_to_end'] - 1:+.1%}, sweep "
          f"{one['sweep'] / local['sweep'] - 1:+.1%} (target < 10%); 2 workers vs in-process "
          f"end-to-end x{local['end_to_end'] / two['end_to_end']:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the small part")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the small part")
    parser.add_argument(
        "--images",
        type=int,
        default=675,
        help="images of the large part (rounded to whole seeds; 0: skip it)",
    )
    parser.add_argument(
        "--own-sessions",
        action="store_true",
        help="diagnostic: each actor in its own session (its own autogroup)",
    )
    args = parser.parse_args()  # fmt: skip
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    actor_class = OwnSessionActor if args.own_sessions else EngineActor
    first_load = _load()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        build_workspace(root, args.candidates)
        os.chdir(root)
        config = RayConfig(num_cpus=2)
        started = time.perf_counter()
        ray = connect(config)
        print(
            f"stand-in SD1.5, 64 px, CPU, {os.cpu_count()} cores; load average (1 min) "
            f"{first_load:.1f} at the start; ray.init {time.perf_counter() - started:.1f} s"
            + ("; DIAGNOSTIC: each actor in its own session" if args.own_sessions else "")
        )
        small_rounds(Bench(root, _evaluation(args.steps, args.seeds)), ray, config,
                     args.rounds, actor_class)  # fmt: skip
        if args.images:
            per_seed = len(plan_jobs(read_candidates(root / "train"),
                                     _evaluation(args.steps, 1), "t", 1234))  # fmt: skip
            seeds = max(1, round(args.images / per_seed))
            large_round(Bench(root, _evaluation(args.steps, seeds)), ray, config, actor_class)
        release_pools()
        print(f"load average (1 min) {_load():.1f} at the end")


if __name__ == "__main__":
    main()
