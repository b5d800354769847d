"""Training speed and memory: CharaForge's trainer against a plain diffusers + peft loop.

Same tiny SD1.5 stand-in, same images, same batch size and step count. Each variant runs in its
own process so that its peak resident memory (ru_maxrss) is its own:

  plain       the diffusers example's loop: per step, decode and resize the images, VAE-encode,
              tokenize and text-encode, noise, predict, AdamW step (no caches)
  no_cache    this trainer with both caches off
  cold_cache  this trainer filling an empty cache (the first run)
  warm_cache  this trainer with the cache already filled (every later run, every candidate)

Steps per second come from the median training step (model loading, cache filling, validation
and export are left out for all); peak memory is the process's peak resident set from model
loading on (imports excluded), read from /proc (Linux).
Ratios are against `plain` measured in the same run; absolute numbers depend on the machine.

    .venv/bin/python benchmarks/bench_train.py [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESOLUTION = 64
BATCH = 2
IMAGES = 8


_BASELINE: dict[str, float] = {}


def _status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM) and note
    the resident size now, so the reported peak is what model loading and training add on top
    of the imported libraries."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    _BASELINE["rss"] = _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak - _BASELINE.get("rss", 0.0)


def make_data(root: Path) -> None:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from charaforge.config import ModelConfig
    from charaforge.models.base import write_base

    write_base(ModelConfig(family="sd15", source="stand_in", resolution=RESOLUTION), root / "base")
    images = root / "dataset" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(IMAGES + 2):
        # Photo-sized files, as a real dataset has: decoding and resizing them is real work.
        pixels = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
        path = images / f"{index}.png"
        Image.fromarray(pixels).save(path)
        split = "train" if index < IMAGES else "val"
        rows.append(
            {"image_path": str(path), "caption": f"aoi_cf, 1girl, pose {index}", "split": split}
        )
    pd.DataFrame(rows).to_parquet(root / "dataset" / "metadata.parquet")


def run_plain(root: Path, steps: int) -> dict[str, float]:
    """The diffusers train_text_to_image_lora loop, minus its CLI (no caches)."""
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms

    from charaforge.models.base import load_base_pipeline

    torch.manual_seed(0)
    reset_peak_rss()
    pipeline = load_base_pipeline(root / "base")
    vae, text_encoder, unet, tokenizer = (
        pipeline.vae, pipeline.text_encoder, pipeline.unet, pipeline.tokenizer,
    )  # fmt: skip
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                   target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )  # fmt: skip
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    rows = pd.read_parquet(root / "dataset" / "metadata.parquet")
    rows = rows[rows["split"] == "train"].reset_index(drop=True)
    preprocess = transforms.Compose([
        transforms.Resize(RESOLUTION), transforms.CenterCrop(RESOLUTION),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
    ])  # fmt: skip
    unet.train()
    started = time.perf_counter()
    seconds = []
    for step in range(steps):
        step_started = time.perf_counter()
        index = [(step * BATCH + i) % len(rows) for i in range(BATCH)]
        pixels = torch.stack(
            [preprocess(Image.open(rows["image_path"][i]).convert("RGB")) for i in index]
        )
        ids = tokenizer(
            [rows["caption"][i] for i in index], padding="max_length",
            max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            states = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, states).sample.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - step_started)
    total = time.perf_counter() - started
    # The UNet's own forward + backward on the last batch, alone: the floor of a training step.
    # Every variant trains the same UNet with the same LoRA on the same shapes, so a step's
    # time beyond this is what the trainer spends outside the UNet.
    unet_seconds = []
    for _ in range(max(5, steps // 2)):
        unet_started = time.perf_counter()
        loss = F.mse_loss(unet(noisy, timesteps, states).sample.float(), noise.float())
        loss.backward()
        unet_seconds.append(time.perf_counter() - unet_started)
    optimizer.zero_grad()
    return {"step_seconds": seconds, "total_seconds": total, "unet_seconds": unet_seconds}


def run_ours(root: Path, steps: int, cache: str) -> dict[str, float]:
    from charaforge.config import TrainConfig
    from charaforge.train import train_candidate

    train = TrainConfig.model_validate(
        {
            "batch_size": BATCH,
            "max_steps": steps,
            "checkpoint_every": steps,
            "target_modules": "attention",
            "candidates": [{"name": "c", "rank": 4, "alpha": 4, "learning_rate": 1e-4}],
            "cache": {
                "latents": cache != "none",
                "text_encoder_outputs": cache != "none",
                "dir": str(root / "cache"),
            },
            "resume": False,
        }
    )
    # Import what the trainer imports lazily, so the memory count starts after imports for both.
    import accelerate  # noqa: F401
    import diffusers.optimization  # noqa: F401
    import peft  # noqa: F401
    from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: F401

    seconds: list[float] = []
    reset_peak_rss()
    started = time.perf_counter()
    train_candidate(
        root / "base", root / "dataset", train.candidates[0], train, RESOLUTION, 0,
        root / f"out-{cache}", on_step=lambda step, m: seconds.append(m["step_seconds"]),
        state_dir=root / f"state-{cache}",
    )  # fmt: skip
    return {"step_seconds": seconds, "total_seconds": time.perf_counter() - started}


def child(variant: str, root: Path, steps: int) -> None:
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # every variant on one thread: the machine is shared
    if variant == "plain":
        result = run_plain(root, steps)
    else:
        result = run_ours(root, steps, {"no_cache": "none"}.get(variant, "on"))
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def measure(variant: str, root: Path, steps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--root", str(root), "--steps", str(steps)],
        capture_output=True, text=True, check=True, cwd=root,
    )  # fmt: skip
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.steps)
        return
    variants = ("plain", "no_cache", "cold_cache", "warm_cache")
    # The machine is shared: variants run interleaved, `--rounds` times, and each keeps its best
    # round; a step's time is the median over its steps (robust to a neighbour's burst).
    best: dict[str, dict] = {}
    unet_rounds: list[list[float]] = []
    print("load average at start (1, 5, 15 min):", os.getloadavg())
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        make_data(root)
        for _ in range(args.rounds):
            shutil.rmtree(root / "cache", ignore_errors=True)
            for variant in variants:
                result = measure(variant, root, args.steps)
                result["median_step"] = statistics.median(result["step_seconds"])
                if "unet_seconds" in result:
                    unet_rounds.append(result["unet_seconds"])
                if variant not in best or result["median_step"] < best[variant]["median_step"]:
                    best[variant] = result
    plain = best["plain"]
    print(
        f"tiny SD1.5 stand-in, {IMAGES} images of 512 px -> {RESOLUTION} px, batch {BATCH}, "
        f"{args.steps} steps, best of {args.rounds} interleaved rounds, one process each"
    )
    unet = min(statistics.median(best_unet) for best_unet in unet_rounds)
    print(f"UNet forward + backward alone (median, best round): {unet * 1000:.1f} ms")
    print(
        f"{'variant':<12} {'steps/s':>8} {'vs plain':>9} {'peak +RSS MB':>12} {'vs plain':>9} "
        f"{'outside UNet fwd/bwd':>21}"
    )
    for variant in variants:
        result = best[variant]
        rate, plain_rate = 1 / result["median_step"], 1 / plain["median_step"]
        outside = max(0.0, 1 - unet / result["median_step"])
        print(
            f"{variant:<12} {rate:8.2f} {rate / plain_rate:8.2f}x "
            f"{result['peak_rss_mb']:12.0f} {result['peak_rss_mb'] / plain['peak_rss_mb']:8.2f}x "
            f"{outside:21.1%}"
        )
    speedup = best["no_cache"]["median_step"] / best["warm_cache"]["median_step"]
    print(f"cache speed-up (warm cache vs no cache, median training step): {speedup:.2f}x")
    fill = best["cold_cache"]["total_seconds"] - best["warm_cache"]["total_seconds"]
    print(f"one-off cost of filling the cache (cold minus warm run, whole run): {fill:.2f} s")
    print("load average at end (1, 5, 15 min):", os.getloadavg())


if __name__ == "__main__":
    main()
