"""Memory modes: peak accelerator memory and time per render for each of the engine's modes.

Modes (CharaConsist's four): `device` (everything on one device), `model_cpu_offload` (whole
models moved to the GPU in turn), `sequential_cpu_offload` (layer by layer), `balanced` (the
pipeline split over the GPUs by accelerate's device map). Each mode renders the same request;
the table shows peak CUDA memory allocated during the render (torch.cuda.max_memory_allocated,
summed over the GPUs), seconds per image, the ratio of both to `device`, and whether the pixels
equal `device`'s. On a machine without CUDA, peak memory cannot be measured: the modes that run
on the CPU (device, model_cpu_offload) are timed and compared, the others are listed with the
reason they refuse. Default model: the SD1.5 stand-in (64 px); `--base` takes any base folder
(real weights give the meaningful memory numbers).

    .venv/bin/python benchmarks/bench_offload.py [--base data/base] [--steps 4] [--size 64]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from charaforge.config import ModelConfig
from charaforge.errors import ConfigError
from charaforge.generate.engine import MEMORY_MODES, GenerationEngine
from charaforge.models.base import write_base

PROMPT = "aoi_cf, 1girl, red hair, standing"


def _peak_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count()))


def _reset_peaks() -> None:
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
            torch.cuda.reset_peak_memory_stats(index)


def measure(base: Path, memory: str, device: str, render: dict, repeats: int) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        engine = GenerationEngine(base, device=device, memory=memory)
    except ConfigError as error:
        return {"mode": memory, "refused": str(error)}
    engine.render(PROMPT, 0, **render)  # warm-up (kernels, allocator)
    _reset_peaks()
    started = time.perf_counter()
    for _ in range(repeats):
        image = engine.render(PROMPT, 1, **render)
    seconds = (time.perf_counter() - started) / repeats
    result = {
        "mode": memory,
        "peak": _peak_bytes(),
        "seconds": seconds,
        "pixels": np.asarray(image).tobytes(),
    }
    del engine
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="base folder (default: stand-in)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    render = {"steps": args.steps, "guidance_scale": 5.0, "width": args.size, "height": args.size}
    with tempfile.TemporaryDirectory() as folder:
        base = args.base
        if base is None:
            base = Path(folder) / "base"
            write_base(ModelConfig(family="sd15", source="stand_in", resolution=args.size), base)
        results = [measure(base, mode, args.device, render, args.repeats) for mode in MEMORY_MODES]
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA)'}; base: {base}")
    reference = next((r for r in results if r["mode"] == "device" and "refused" not in r), None)
    print(f"{'mode':<24}{'peak MiB':>10}{'x device':>10}{'s/image':>10}{'x device':>10}  same")
    for result in results:
        if "refused" in result:
            print(f"{result['mode']:<24}refused: {result['refused']}")
            continue
        peak = f"{result['peak'] / 2**20:.1f}" if cuda else "n/a"
        peak_ratio = (
            f"{result['peak'] / reference['peak']:.2f}" if cuda and reference["peak"] else "n/a"
        )
        time_ratio = result["seconds"] / reference["seconds"] if reference else float("nan")
        same = reference is not None and result["pixels"] == reference["pixels"]
        print(
            f"{result['mode']:<24}{peak:>10}{peak_ratio:>10}{result['seconds']:>10.3f}"
            f"{time_ratio:>10.2f}  {'yes' if same else 'no'}"
        )
    if not cuda:
        print("peak accelerator memory is not measurable without CUDA")


if __name__ == "__main__":
    main()
