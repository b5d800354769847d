"""Start-up: `charaforge --help`, argument errors, and a cold `charaforge generate`.

Every command runs as a fresh process (median of --rounds), against baselines measured in the
same run: the bare interpreter (`python -c pass`) for help and errors (target: < 0.5 s, and
no torch imported), and, for one cold 64 px image from the stand-in SD1.5 base, a minimal
diffusers script that loads the same pipeline and renders the same image (target <= 1.2x).

    .venv/bin/python benchmarks/bench_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHARAFORGE = [sys.executable, "-c", "from charaforge.cli import app; app()"]
MINIMAL_DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None)
pipe.set_progress_bar_config(disable=True)
image = pipe("aoi_cf, 1girl", num_inference_steps=4, height=64, width=64,
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save(sys.argv[2])
"""


def timed_runs(command: list[str], rounds: int, expect: int = 0) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
        if result.returncode != expect:
            raise SystemExit(f"{command}: exit {result.returncode}\n{result.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}, load {os.getloadavg()[0]:.1f} (compare ratios)")
    interpreter = timed_runs([sys.executable, "-c", "pass"], args.rounds)
    heavy = timed_runs([sys.executable, "-c", "import torch, diffusers"], args.rounds)
    print(
        f"baselines: bare interpreter {interpreter:.2f} s | `import torch, diffusers` {heavy:.2f} s"
    )
    for label, arguments, code in [
        ("charaforge --help", ["--help"], 0),
        ("charaforge generate --help", ["generate", "--help"], 0),
        ("argument error (--preset turbo)", ["generate", "x", "--preset", "turbo"], 2),
        ("LoRA error (--lora nobody@3)", ["generate", "x", "--lora", "nobody@3"], 2),
    ]:
        seconds = timed_runs(CHARAFORGE + arguments, args.rounds, expect=code)
        print(
            f"{label:<34} {seconds:5.2f} s  ({seconds - interpreter:+.2f} s over the interpreter,"
            f" target < 0.5 s; ratio {seconds / heavy:.2f} of `import torch, diffusers`)"
        )
    os.environ.setdefault("TQDM_DISABLE", "1")
    from charaforge.config import ModelConfig
    from charaforge.models.base import PIPELINE_DIR, write_base

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        base = Path(folder) / "base"
        write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), base)
        minimal = timed_runs(
            [sys.executable, "-c", MINIMAL_DIFFUSERS, str(base / PIPELINE_DIR), f"{folder}/d.png"],
            args.rounds,
        )
        ours = timed_runs(
            CHARAFORGE
            + ["generate", "aoi_cf, 1girl", "--steps", "4", "--base", str(base)]
            + ["--out", f"{folder}/c.png", "--device", "cpu"],
            args.rounds,
        )
    print(
        f"cold generate, one 64 px image: charaforge {ours:.2f} s | minimal diffusers script "
        f"{minimal:.2f} s | ratio {ours / minimal:.2f}x (target <= 1.2x)"
    )


if __name__ == "__main__":
    main()
