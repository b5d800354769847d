"""The sweep on Ray: images/s with 1 and 2 engine actors, and the Ray path's overhead at 1 actor
against the in-process sweep, all measured in the same run (ratios, not absolute speeds).

Targets: 2 workers >= 1.6x one worker (on 2 free cores), Ray at 1 worker < 10% slower than in
process. Rounds interleave the paths (in-process, 1 actor, 2 actors, then again), so a burst of
load from elsewhere hits them alike; every number of every round is printed, with the load
average before and after each. Per Ray path and round:

- end to end: a cold pool (new actor processes: imports, base model) plus the sweep;
- steady state: the same sweep again on the now warm pool (the kept pool of
  distributed/engine_pool.py: what every later sweep of a process gets).

Beside the wall time, each actor reports the CPU seconds it got and the seconds it spent
rendering, so a ratio below 2 can be told apart: CPU the machine did not give (shared cores;
Linux's autogroup shares the CPU between sessions, not processes), or time the workers waited
(start-up, uneven shares, the driver's merge). Every sweep renders into a fresh folder and its
images must be byte-identical to the in-process ones. Stand-in models (random weights, 64 px).

    .venv/bin/python benchmarks/bench_distributed.py [--steps 6] [--seeds 2] [--rounds 2]
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
from charaforge.generate.sweep import run_sweep  # noqa: E402

OPTIONS = {"scheduler": "euler", "controlnets": {}, "cpu_threads": 1}


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


def _autogroup(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
    except OSError:
        return "?"


class Bench:
    def __init__(self, root: Path, evaluation: EvalConfig) -> None:
        self.root, self.evaluation = root, evaluation
        self.reference: dict[str, str] | None = None
        self.runs = 0
        self.images = 0
        self.merge_seconds: list[float] = []

    def sweep(self, engine: GenerationEngine | None, executor: RaySweepExecutor | None) -> float:
        out = self.root / f"out-{self.runs}"
        self.runs += 1
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


def _actors_busy(ray, executor: RaySweepExecutor) -> list[dict[str, float]]:
    actors, _ = executor.pool().ready(executor.workers)
    return ray.get([actor.busy.remote() for actor in actors])


def _delta(after: list[dict], before: list[dict], key: str) -> list[float]:
    return [a[key] - b[key] for a, b in zip(after, before, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--own-sessions",
        action="store_true",
        help="diagnostic: each actor in its own session (its own autogroup)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    evaluation = EvalConfig(
        prompts=["t, standing", "t, sitting", "t, arms up"],
        negative_prompt="lowres",
        seeds=list(range(args.seeds)),
        lora_scales=[0.0, 0.5, 1.0],
        steps=args.steps,
        guidance_scale=5.0,
        scheduler="euler",
        batch_size=4,
        cpu_threads=1,
    )
    first_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        build_workspace(root, args.candidates)
        os.chdir(root)
        bench = Bench(root, evaluation)
        started = time.perf_counter()
        engine = GenerationEngine(root / "base", **OPTIONS)
        engine.render("warm", 0, steps=1)
        engine_seconds = time.perf_counter() - started
        config = RayConfig(num_cpus=2)
        ray = connect(config)

        rows: list[dict] = []
        for round_index in range(args.rounds):
            load = os.getloadavg()[0]
            local = bench.sweep(engine, None)
            rows.append({"round": round_index, "path": "local", "steady": local,
                         "load": (load, os.getloadavg()[0])})  # fmt: skip
            for workers in (1, 2):
                release_pools()  # cold: new actor processes
                load = os.getloadavg()[0]
                actor_class = OwnSessionActor if args.own_sessions else EngineActor
                executor = RaySweepExecutor(config, workers, str(root / "base"), OPTIONS,
                                            actor_class=actor_class)  # fmt: skip
                cold = bench.sweep(None, executor)
                startup = executor.startup_seconds
                before = _actors_busy(ray, executor)
                steady = bench.sweep(None, executor)
                assert executor.startup_seconds == 0.0, "the kept actors were restarted"
                after = _actors_busy(ray, executor)
                rows.append({
                    "round": round_index, "path": f"ray-{workers}", "end_to_end": cold,
                    "startup": startup, "steady": steady, "units": list(executor.units_done),
                    "cpu": _delta(after, before, "cpu"), "busy": _delta(after, before, "busy"),
                    "threads": [a["torch_threads"] for a in after],
                    "groups": sorted({_autogroup(pid) for pid in executor.worker_pids}),
                    "load": (load, os.getloadavg()[0]),
                })  # fmt: skip
        release_pools()
        images = bench.images
        merge = bench.merge_seconds
        print(f"stand-in SD1.5, 64 px, CPU, {images} images per sweep, every sweep the same bytes")
        print(f"load average (1 min) {first_load:.1f} at the start, {os.getloadavg()[0]:.1f} at "
              f"the end, on {os.cpu_count()} cores (the ratios need free cores)")  # fmt: skip
        print(f"the driver's own part of a sweep (plan, index, grids): {min(merge):.2f}-"
              f"{max(merge):.2f} s per sweep")  # fmt: skip
        print(f"this process's autogroup: {_autogroup(os.getpid())}; one-time in-process engine "
              f"load {engine_seconds:.2f} s")  # fmt: skip
        if args.own_sessions:
            print("DIAGNOSTIC: each actor in its own session (own autogroup), not the default")
        for row in rows:
            load = f"load {row['load'][0]:4.1f}->{row['load'][1]:4.1f}"
            if row["path"] == "local":
                print(f"round {row['round']} local   steady {row['steady']:6.2f} s "
                      f"{images / row['steady']:5.2f} img/s  {load}")  # fmt: skip
                continue
            cpu = "+".join(f"{c:.1f}" for c in row["cpu"])
            busy = "+".join(f"{b:.1f}" for b in row["busy"])
            print(f"round {row['round']} {row['path']:7} end-to-end {row['end_to_end']:6.2f} s "
                  f"(start-up {row['startup']:5.2f} s)  steady {row['steady']:6.2f} s "
                  f"{images / row['steady']:5.2f} img/s  {load}")  # fmt: skip
            print(f"          steady: actor CPU {cpu} s, rendering {busy} s, units "
                  f"{row['units']}, torch threads {row['threads']}, autogroups "
                  f"{row['groups']}")  # fmt: skip
        by_round = {(r["round"], r["path"]): r for r in rows}
        for kind in ("end_to_end", "steady"):
            ratios = [by_round[(i, "ray-1")][kind] / by_round[(i, "ray-2")][kind]
                      for i in range(args.rounds)]  # fmt: skip
            shown = ", ".join(f"x{ratio:.2f}" for ratio in ratios)
            print(f"2 vs 1 worker, {kind.replace('_', '-')}: rounds {shown}; median "
                  f"x{statistics.median(ratios):.2f} (target >= 1.6)")  # fmt: skip
        cpu_ratio = [sum(by_round[(i, "ray-2")]["cpu"]) / sum(by_round[(i, "ray-1")]["cpu"])
                     * by_round[(i, "ray-1")]["steady"] / by_round[(i, "ray-2")]["steady"]
                     for i in range(args.rounds)]  # fmt: skip
        print(
            "CPU the 2 actors got per wall second, against 1 actor: "
            + ", ".join(f"x{ratio:.2f}" for ratio in cpu_ratio)
        )
        per_cpu = [
            (
                images / sum(by_round[(i, "ray-1")]["cpu"]),
                images / sum(by_round[(i, "ray-2")]["cpu"]),
            )
            for i in range(args.rounds)
        ]
        print(
            "images per actor CPU second, 1 vs 2 workers: "
            + ", ".join(f"{one:.2f} vs {two:.2f}" for one, two in per_cpu)
        )
        overheads = [by_round[(i, "ray-1")]["steady"] / by_round[(i, "local")]["steady"] - 1
                     for i in range(args.rounds)]  # fmt: skip
        print(
            "Ray overhead at 1 worker vs in-process (steady): "
            + ", ".join(f"{o:+.1%}" for o in overheads)
            + f"; median {statistics.median(overheads):+.1%} (target < 10%)"
        )


if __name__ == "__main__":
    main()
