"""Serving overhead: images/s through the HTTP API and the batch queue against the engine called
directly, measured in the same run on the same engine.

The three paths render the same images (batch 4, the same seeds), in interleaved rounds:
`direct` calls `GenerationEngine.render_batch`; `http` posts `/txt2img` with `batch_size` 4 to a
real uvicorn on loopback (JSON, base64 PNGs); `batch` submits a job of 4 rows to `/api/v1/batch`
and waits for it (SQLite, PNG + JSON written per image; rows that share their settings render up
to `max_batch` = 4 per engine call, one commit per call). Stand-in models (random weights); the
numbers are ratios on this machine, not absolute speeds of real models. Target: overhead under
10% at batch 4.

    .venv/bin/python benchmarks/bench_serve.py [--steps 8] [--size 128] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import requests
import torch

from charaforge.config import ModelConfig
from charaforge.generate.request import RenderRequest
from charaforge.models.base import write_base
from charaforge.serve.app import create_app
from charaforge.serve.limits import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_fixtures import running  # noqa: E402

PROMPT = "aoi_cf, 1girl, red hair"


def run_batch(url: str, rows: list[dict]) -> None:
    """Submit a job and wait for it (polled every 50 ms: a tighter loop would take CPU from
    the worker on a 2-core machine)."""
    job = requests.post(f"{url}/api/v1/batch/submit", json=rows, timeout=60).json()
    while True:
        status = requests.get(f"{url}/api/v1/batch/status/{job['job_id']}", timeout=60).json()
        if status["state"] not in ("running", "queued"):
            break
        time.sleep(0.05)
    assert status["done"] == len(rows), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
        (root / "loras").mkdir()
        settings = ServerSettings(
            base_dir=root / "base",
            lora_dir=root / "loras",
            devices=["cpu"],
            cpu_threads=1,
            outputs_dir=root / "outputs",
            max_cost=args.size**2 * args.steps * 4,
        )
        app = create_app(settings)
        engine = app.state.service.engine
        requests_direct = [
            RenderRequest(
                prompt=PROMPT, seed=seed, steps=args.steps, width=args.size, height=args.size
            )
            for seed in range(4)
        ]
        engine.render_batch(requests_direct)  # warm-up
        images = 4 * args.rounds
        with running(app) as url:
            body = {
                "prompt": PROMPT,
                "steps": args.steps,
                "width": args.size,
                "height": args.size,
                "batch_size": 4,
            }
            assert requests.post(f"{url}/txt2img", json=body, timeout=600).ok  # warm-up
            rows = [
                {
                    "prompt": PROMPT,
                    "seed": seed,
                    "steps": args.steps,
                    "width": args.size,
                    "height": args.size,
                }
                for seed in range(4)
            ]
            run_batch(url, rows)  # warm-up
            # Interleaved rounds (direct, http, batch, direct, ...): a load change on a shared
            # machine then hits every path alike.
            timings = {"direct": 0.0, "http": 0.0, "batch": 0.0}
            for _ in range(args.rounds):
                start = time.perf_counter()
                engine.render_batch(requests_direct)
                timings["direct"] += time.perf_counter() - start
                start = time.perf_counter()
                response = requests.post(f"{url}/txt2img", json=body, timeout=600)
                assert response.ok, response.text
                timings["http"] += time.perf_counter() - start
                start = time.perf_counter()
                run_batch(url, rows)
                timings["batch"] += time.perf_counter() - start
        app.state.batches.stop()
        app.state.service.stop()
    print(f"{images} images, {args.size} px, {args.steps} steps, batch 4, stand-in SD1.5, 1 thread")
    print(f"{'path':<8}{'images/s':>10}{'overhead':>10}")
    for name, seconds in timings.items():
        overhead = seconds / timings["direct"] - 1
        print(f"{name:<8}{images / seconds:>10.2f}{overhead:>+10.1%}")


if __name__ == "__main__":
    main()
