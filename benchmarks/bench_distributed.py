"""The sweep on Ray: images/s with 1 and 2 engine actors, and the Ray path's overhead at 1 actor
against the in-process sweep, all measured in the same run (ratios, not absolute speeds).

Targets: 2 workers >= 1.6x one worker (on 2 free cores), Ray at 1 worker < 10% slower than in
process. The actors are the kept pool (distributed/engine_pool.py): started once, then every
sweep of the process finds them warm, as the in-process sweep finds its engine loaded; the
one-time start-up of each path (loading an engine, starting the actors) is printed beside.
The sweeps run in rounds (in-process, 1 actor, 2 actors, in turn) and each path's fastest
round counts, so a burst of load from elsewhere hits all paths alike. Each sweep renders into
a fresh folder; every one's images must be byte-identical to the in-process ones. Stand-in
models (random weights, 64 px).

    .venv/bin/python benchmarks/bench_distributed.py [--steps 6] [--candidates 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
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
from charaforge.distributed.engine_pool import kept_pool  # noqa: E402
from charaforge.distributed.ray_sweep import RaySweepExecutor  # noqa: E402
from charaforge.generate.engine import GenerationEngine  # noqa: E402
from charaforge.generate.sweep import run_sweep  # noqa: E402

OPTIONS = {"scheduler": "euler", "controlnets": {}, "cpu_threads": 1}


def _images(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((folder / "images").rglob("*.png"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    evaluation = EvalConfig(
        prompts=["t, standing", "t, sitting", "t, arms up"],
        negative_prompt="lowres",
        seeds=[0, 1],
        lora_scales=[0.0, 0.5, 1.0],
        steps=args.steps,
        guidance_scale=5.0,
        scheduler="euler",
        batch_size=4,
        cpu_threads=1,
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        build_workspace(root, args.candidates)
        os.chdir(root)
        started = time.perf_counter()
        engine = GenerationEngine(root / "base", **OPTIONS)
        engine.render("warm", 0, steps=1)
        engine_seconds = time.perf_counter() - started

        config = RayConfig(num_cpus=2)
        connect(config)
        executors = {w: RaySweepExecutor(config, w, str(root / "base"), OPTIONS) for w in (1, 2)}
        started, launched = time.perf_counter(), time.time()
        executors[2].start()  # the kept pool: 2 actors, the 1-worker sweeps use the first
        actors, _ = kept_pool(config, root / "base", OPTIONS).ready(2)
        pool_seconds = time.perf_counter() - started
        import ray

        phases = [ray.get(actor.start_times.remote()) for actor in actors]

        seconds: dict[str, list[float]] = {"local": [], "ray-1": [], "ray-2": []}
        reference: dict[str, str] | None = None
        images = 0
        for round_index in range(args.rounds):
            for name in seconds:
                out = root / f"{name}-{round_index}"
                executor = executors[int(name[-1])] if name != "local" else None
                started = time.perf_counter()
                result = run_sweep(engine if executor is None else None, root / "train",
                                   evaluation, "t", 64, 1234, out, executor=executor,
                                   stand_in=True)  # fmt: skip
                seconds[name].append(time.perf_counter() - started)
                if executor is not None:
                    assert executor.startup_seconds == 0.0, "the kept actors were restarted"
                reference = reference or _images(out)
                assert _images(out) == reference, f"{name}: bytes differ"
                images = result.rendered
        best = {name: min(values) for name, values in seconds.items()}
        load_after = os.getloadavg()[0]
        print(f"stand-in SD1.5, 64 px, CPU, 1 thread per worker, {images} images, same bytes")
        print(f"load average {load_before:.1f} before, {load_after:.1f} after, on "
              f"{os.cpu_count()} cores (the ratios need free cores)")  # fmt: skip
        print(f"one-time: loading the in-process engine {engine_seconds:.2f} s, starting 2 "
              f"kept actors {pool_seconds:.2f} s")  # fmt: skip
        for index, times in enumerate(phases):
            print(f"  actor {index}: process up after {times['process'] - launched:.2f} s, "
                  f"imports {times['imported'] - times['process']:.2f} s, engine load "
                  f"{times['loaded'] - times['imported']:.2f} s")  # fmt: skip
        for name, values in seconds.items():
            shown = ", ".join(f"{value:.2f}" for value in values)
            print(f"{name:8} best {best[name]:7.2f} s {images / best[name]:6.2f} img/s "
                  f"(rounds: {shown})")  # fmt: skip
        print(f"speed-up 2 vs 1 worker: x{best['ray-1'] / best['ray-2']:.2f} (target >= 1.6)")
        overhead = best["ray-1"] / best["local"] - 1
        print(f"Ray overhead at 1 worker vs in-process: {overhead:+.1%} (target < 10%)")


if __name__ == "__main__":
    main()
