"""Sweep throughput: the engine's sweep against a naive loop, measured in the same run.

The naive loop is what a script without the engine does: for every checkpoint it loads the base
pipeline again, attaches the LoRA, and renders one image per call. The sweep loads the base
once, swaps LoRAs in place and renders in batches (exact mode: each image byte-identical to its
single render). Also printed: the share of wall time spent outside the UNet (+ControlNet) and the
VAE decoder, timed by the engine's hooks around those modules, i.e. the overhead a faster sweep
could still remove. Stand-in models (random weights, 64 px); the numbers are ratios on this
machine, not absolute speeds of real models.

    .venv/bin/python benchmarks/bench_sweep.py [--steps 6] [--candidates 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the table

import torch

from charaforge.config import EvalConfig, ModelConfig, TrainConfig
from charaforge.core.layout import checkpoint_path
from charaforge.generate.batching import RenderTimer
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.sweep import BASE_CANDIDATE, plan_jobs, read_candidates, run_sweep
from charaforge.models.base import write_base
from charaforge.train import train_all

# The benchmark trains on the same drawn images as the engine tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from engine_fixtures import write_drawn_dataset  # noqa: E402


def build_workspace(root: Path, candidates: int) -> None:
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
    write_drawn_dataset(root / "dataset", "t")
    train = TrainConfig(
        batch_size=2,
        max_steps=4,
        checkpoint_every=2,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        candidates=[
            {"name": f"c{index}", "rank": 4, "alpha": 4, "learning_rate": 1e-3}
            for index in range(candidates)
        ],
        cache={"dir": str(root / "cache")},
    )
    train_all(
        root / "base",
        root / "dataset",
        train,
        64,
        1,
        root / "train",
        root / "plots",
        state_dir=root / "train_state",
    )


def naive_loop(root: Path, evaluation: EvalConfig, seed: int, timer: RenderTimer) -> int:
    """Reload the pipeline for every checkpoint; one image per call."""
    jobs = plan_jobs(read_candidates(root / "train"), evaluation, "t", seed)
    rendered, current, engine = 0, None, None
    for job in jobs:
        if (job.candidate, job.step) != current:
            engine = GenerationEngine(root / "base", scheduler=evaluation.scheduler, device="cpu")
            engine.timer = timer
            current = (job.candidate, job.step)
            if job.candidate != BASE_CANDIDATE:
                engine.load_lora("lora", checkpoint_path(root / "train" / job.candidate, job.step))
        loras = {"lora": job.lora_scale} if job.candidate != BASE_CANDIDATE else {}
        engine.render(
            job.prompt.text,
            job.seed,
            loras=loras,
            steps=evaluation.steps,
            guidance_scale=evaluation.guidance_scale,
            negative_prompt=evaluation.negative_prompt,
        )
        rendered += 1
    return rendered


def sweep(root: Path, evaluation: EvalConfig, seed: int, batch_mode: str, timer: RenderTimer):
    started = time.perf_counter()
    engine = GenerationEngine(
        root / "base", scheduler=evaluation.scheduler, device="cpu", batch_mode=batch_mode
    )
    loading = time.perf_counter() - started
    engine.timer = timer
    load_lora, lora_seconds = engine.load_lora, [0.0]

    def timed_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the engine's signature
        lora_started = time.perf_counter()
        try:
            return load_lora(*args, **kwargs)
        finally:
            lora_seconds[0] += time.perf_counter() - lora_started

    engine.load_lora = timed_load
    out = root / f"sweep-{batch_mode}"
    result = run_sweep(engine, root / "train", evaluation, "t", 64, seed, out)
    seconds = time.perf_counter() - started
    print(
        f"  ({batch_mode}: of the time outside UNet + VAE, loading the base pipeline once "
        f"{loading / seconds:5.1%} and the LoRA checkpoints {lora_seconds[0] / seconds:5.1%} "
        "of the sweep's wall time)"
    )
    return result.rendered, seconds


def report(name: str, images: int, seconds: float, timer: RenderTimer, baseline: float) -> None:
    outside = max(seconds - timer.unet - timer.vae, 0.0) / seconds
    rate = images / seconds
    print(
        f"{name:<28} {images:4d} images {seconds:7.2f} s {rate:7.2f} img/s "
        f"x{rate / baseline:5.2f}  UNet {timer.unet / seconds:5.1%}  VAE {timer.vae / seconds:5.1%}"
        f"  outside UNet+VAE {outside:5.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (as the demo)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    print("load average at start (1, 5, 15 min):", os.getloadavg())
    evaluation = EvalConfig(
        prompts=["t, standing", "t, sitting", "t, arms up"],
        negative_prompt="lowres",
        seeds=[0, 1],
        lora_scales=[0.0, 0.5, 1.0],
        steps=args.steps,
        guidance_scale=5.0,
        scheduler="euler",
        batch_size=args.batch_size,
    )
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        build_workspace(root, args.candidates)
        # Warm-up: first calls pay for lazy imports and allocator growth.
        GenerationEngine(root / "base", device="cpu").render("warm", 0, steps=1)

        naive_timer = RenderTimer()
        started = time.perf_counter()
        naive_images = naive_loop(root, evaluation, 1234, naive_timer)
        naive_seconds = time.perf_counter() - started
        baseline = naive_images / naive_seconds

        print(
            f"stand-in SD1.5, 64 px, CPU, {args.threads} thread(s), {args.steps} steps; "
            "ratios against the naive loop of the same run"
        )
        report("naive (reload, 1 per call)", naive_images, naive_seconds, naive_timer, baseline)
        for mode in ("exact", "fused"):
            timer = RenderTimer()
            images, seconds = sweep(root, evaluation, 1234, mode, timer)
            assert images == naive_images
            report(f"sweep ({mode}, batch {args.batch_size})", images, seconds, timer, baseline)
    print("load average at end (1, 5, 15 min):", os.getloadavg())


if __name__ == "__main__":
    main()
