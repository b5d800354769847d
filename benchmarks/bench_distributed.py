"""The sweep on Ray: images/s with 1 and 2 engine actors, and the Ray path's overhead at 1 actor
against the in-process sweep, all measured in the same run (ratios, not absolute speeds).

Targets: 2 workers >= 1.6x one worker (on 2 free cores), Ray at 1 worker < 10% slower than in
process. The Ray timings include starting the actors (each loads the base model) but not
`ray.init` (paid once per cluster). Each run renders into a fresh folder; every run's images
must be byte-identical to the in-process ones. Stand-in models (random weights, 64 px).

    .venv/bin/python benchmarks/bench_distributed.py [--steps 6] [--candidates 2]
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
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        build_workspace(root, args.candidates)
        os.chdir(root)
        GenerationEngine(root / "base", **OPTIONS).render("warm", 0, steps=1)

        started = time.perf_counter()
        engine = GenerationEngine(root / "base", **OPTIONS)
        local = run_sweep(engine, root / "train", evaluation, "t", 64, 1234, root / "local")
        local_seconds = time.perf_counter() - started
        reference = _images(root / "local")

        connect(RayConfig(num_cpus=2))
        seconds, startup = {}, {}
        for workers in (1, 2):
            executor = RaySweepExecutor(RayConfig(num_cpus=2), workers, str(root / "base"), OPTIONS)
            out = root / f"ray-{workers}"
            started = time.perf_counter()
            result = run_sweep(None, root / "train", evaluation, "t", 64, 1234, out,
                               executor=executor, stand_in=True)  # fmt: skip
            seconds[workers] = time.perf_counter() - started
            startup[workers] = executor.startup_seconds
            assert result.rendered == local.rendered
            assert _images(out) == reference, f"{workers} worker(s): bytes differ"
        images = local.rendered
        load = os.getloadavg()[0]
        print(f"stand-in SD1.5, 64 px, CPU, 1 thread per worker, {images} images, same bytes")
        print(f"load average {load:.1f} on {os.cpu_count()} cores (ratios need free cores)")
        print(f"in-process       {local_seconds:7.2f} s {images / local_seconds:6.2f} img/s")
        for workers, value in seconds.items():
            print(
                f"ray, {workers} worker(s) {value:7.2f} s {images / value:6.2f} img/s "
                f"(of which starting the actors {startup[workers]:.2f} s)"
            )
        rendering = {w: seconds[w] - startup[w] for w in seconds}
        print(f"speed-up 2 vs 1 worker: x{seconds[1] / seconds[2]:.2f} (target >= 1.6); "
              f"rendering only x{rendering[1] / rendering[2]:.2f}")  # fmt: skip
        overhead, warm = seconds[1] / local_seconds - 1, rendering[1] / local_seconds - 1
        print(f"Ray overhead at 1 worker vs in-process: {overhead:+.1%} (target < 10%); "
              f"with warm actors {warm:+.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
