"""Serving overhead: images/s through the HTTP API and the batch queue against the engine called
directly, measured in the same run on the same engine.

Every path renders batches of 4 (the same seeds), in interleaved rounds:
- `direct` calls `GenerationEngine.render_batch` once (4 images);
- `http` posts `/txt2img` with `batch_size` 4 to a real uvicorn on loopback (JSON, base64 PNGs);
- `batch4` submits a 4-row job to `/api/v1/batch` and waits for it to end (SQLite, PNG + JSON
  written per image; the 4 rows share their settings, so they are one engine call of
  `max_batch` = 4 and one commit);
- `direct16` calls `render_batch` 4 times (16 images, 4 per call) and `batch16` submits those 16
  rows as one job: the shape a batch queue is for. A 4-row job is one engine call, so its fixed
  per-job costs (the submit, SQLite, the last group's files, the client learning of the end)
  are spread over one render only; over 16 rows they are spread over four, and the queue
  writes a group's files while the next group renders. Both are printed, each against the
  direct path that renders the same images.

The client waits with `GET /api/v1/batch/status/{id}?wait=30` (a long poll: the answer comes the
moment the job ends); `--client poll` asks every 50 ms instead, as a client without the long poll
does (each poll also takes the server's GIL from the render in this one-process setup). Stand-in
models (random weights); the numbers are ratios on this machine, not absolute speeds of real
models. Target: overhead under 10% at batch 4. The load average is printed beside the numbers
(the machine is shared).

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
BATCH = 4
LONG_ROWS = 16


def run_batch(url: str, rows: list[dict], client: str) -> None:
    """Submit a job and wait for its end: a long poll, or a poll every 50 ms."""
    job = requests.post(f"{url}/api/v1/batch/submit", json=rows, timeout=60).json()
    status_url = f"{url}/api/v1/batch/status/{job['job_id']}"
    while True:
        params = {"wait": 30} if client == "wait" else None
        status = requests.get(status_url, params=params, timeout=90).json()
        if status["state"] not in ("running", "queued"):
            break
        if client == "poll":
            time.sleep(0.05)
    assert status["done"] == len(rows), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--client", choices=("wait", "poll"), default="wait")
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
            max_batch=BATCH,
            max_cost=args.size**2 * args.steps * BATCH,
        )
        app = create_app(settings)
        engine = app.state.service.engine

        def direct_requests(seeds: range) -> list[RenderRequest]:
            return [
                RenderRequest(
                    prompt=PROMPT, seed=seed, steps=args.steps, width=args.size, height=args.size
                )
                for seed in seeds
            ]

        def rows(count: int) -> list[dict]:
            shape = {"steps": args.steps, "width": args.size, "height": args.size}
            return [{"prompt": PROMPT, "seed": seed, **shape} for seed in range(count)]

        short, long = direct_requests(range(BATCH)), direct_requests(range(LONG_ROWS))
        body = {"prompt": PROMPT, "steps": args.steps, "width": args.size, "height": args.size}
        body["batch_size"] = BATCH
        engine.render_batch(short)  # warm-up
        with running(app) as url:
            assert requests.post(f"{url}/txt2img", json=body, timeout=600).ok  # warm-up
            run_batch(url, rows(BATCH), args.client)  # warm-up

            def http() -> None:
                response = requests.post(f"{url}/txt2img", json=body, timeout=600)
                assert response.ok, response.text

            paths = {
                "direct": lambda: engine.render_batch(short),
                "http": http,
                "batch4": lambda: run_batch(url, rows(BATCH), args.client),
                "direct16": lambda: [
                    engine.render_batch(long[i : i + BATCH]) for i in range(0, LONG_ROWS, BATCH)
                ],
                "batch16": lambda: run_batch(url, rows(LONG_ROWS), args.client),
            }
            # Interleaved rounds (every path once per round): a load change on a shared machine
            # then hits every path alike.
            timings = dict.fromkeys(paths, 0.0)
            load_before = os.getloadavg()
            for _ in range(args.rounds):
                for name, path in paths.items():
                    start = time.perf_counter()
                    path()
                    timings[name] += time.perf_counter() - start
            load_after = os.getloadavg()
        app.state.batches.stop()
        app.state.service.stop()
    print(
        f"{args.rounds} rounds, {args.size} px, {args.steps} steps, batch {BATCH}, stand-in SD1.5, "
        f"1 thread, client {args.client}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    print(f"{'path':<9}{'images':>7}{'images/s':>10}{'overhead':>10}  against")
    for name, seconds in timings.items():
        images = args.rounds * (LONG_ROWS if name.endswith("16") else BATCH)
        baseline = "direct16" if name.endswith("16") else "direct"
        overhead = seconds / timings[baseline] - 1
        print(f"{name:<9}{images:>7}{images / seconds:>10.2f}{overhead:>+10.1%}  {baseline}")


if __name__ == "__main__":
    main()
