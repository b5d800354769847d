"""Sweep throughput: the engine's sweep against a naive loop, measured in the same run.

The naive loop is what a script without the engine does: for every checkpoint it loads the base
pipeline again, attaches the LoRA, and renders one image per call. The sweep loads the base
once (counted: a sweep always pays it once), swaps each checkpoint's weights into the loaded
LoRA layers and renders in batches: `exact` (each image byte-identical to its single render) and
`fused` (one forward per batch; the mode of the generate stage's default eval config, `world`).
Printed for each: the share of wall time inside the UNet (+ControlNet) and the VAE decoder,
timed by the engine's hooks, and what the rest is: loading the base pipeline, loading/swapping
LoRAs, and everything else (text encoding, schedulers, image conversion, PNG files, Python).

Three sweep sizes by default: 54 images (3 prompts x 2 seeds x 9 cells), 216 (8 seeds) and 648
(24 seeds), about what the stage renders (the world demo: 680). Stand-in models (random
weights, 64 px) unless `--real-shape`: SD1.5's real UNet (860M), CLIP ViT-L and VAE with seeded
random weights, 64 px, few images (one candidate, two checkpoints, a few seeds) because it is slow
on a CPU.

    .venv/bin/python benchmarks/bench_sweep.py [--steps 6] [--seeds 2 8 24] [--real-shape]

`--batch-size` defaults to the generate stage's (params.yaml: the world eval config's 20, fused).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
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

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def build_workspace(root: Path, candidates: int) -> None:
    write_base(ModelConfig(family="sd15", source="stand_in", resolution=64), root / "base")
    write_drawn_dataset(root / "dataset", "t")
    train = TrainConfig(
        batch_size=2,
        max_steps=4,
        checkpoint_every=2,
        target_modules=ATTENTION,
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


def build_real_shape_workspace(root: Path, checkpoints: int) -> None:
    """A `pretrained` base holding SD1.5's real shapes (seeded random weights) and one candidate
    whose checkpoints are rank-4 attention LoRAs with seeded random weights (training the 860M
    UNet on this CPU would take longer than the benchmark)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from test_lora_real_sd15_step import SD15_VAE
    from test_lora_real_shapes import CLIP_L, SD15_UNET
    from transformers import CLIPTextConfig, CLIPTextModel

    from charaforge.models.base import assemble_sd15_pipeline, build_clip_tokenizer, save_stand_in

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        pipeline = assemble_sd15_pipeline(
            AutoencoderKL(**SD15_VAE),
            unet,
            CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            build_clip_tokenizer(),
        )
        save_stand_in(pipeline, root / "weights")
        config = LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION, init_lora_weights=False)
        unet.add_adapter(config)
        steps = [2 * (index + 1) for index in range(checkpoints)]
        for step in steps:
            for name, parameter in unet.named_parameters():
                if "lora_" in name:
                    parameter.data.normal_(0.0, 0.02)
            state = get_peft_model_state_dict(unet)
            folder = checkpoint_path(root / "train" / "real", step).parent
            StableDiffusionPipeline.save_lora_weights(
                folder, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict()
            )
    del pipeline, unet
    gc.collect()
    model = ModelConfig(
        family="sd15", source="pretrained", path=str(root / "weights"), resolution=64
    )
    write_base(model, root / "base")
    summary = {"candidates": [{"name": "real", "checkpoints": steps}]}
    (root / "train" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


class Clock:
    """Wall seconds of a run, and of its pipeline and LoRA loads (the engine's own methods,
    wrapped), beside the UNet / VAE seconds of the engine's timer."""

    def __init__(self) -> None:
        self.timer, self.pipeline, self.lora, self.wall = RenderTimer(), 0.0, 0.0, 0.0
        self.excluded = 0.0

    def engine(self, root: Path, evaluation: EvalConfig, batch_mode: str) -> GenerationEngine:
        started = time.perf_counter()
        engine = GenerationEngine(
            root / "base", scheduler=evaluation.scheduler, device="cpu", batch_mode=batch_mode
        )
        self.pipeline += time.perf_counter() - started
        engine.timer = self.timer
        for method in ("load_lora", "swap_lora"):
            setattr(engine, method, self._timed(getattr(engine, method)))
        return engine

    def untimed(self, function) -> None:  # noqa: ANN001 - any call left out of the wall time
        started = time.perf_counter()
        function()
        self.excluded += time.perf_counter() - started

    def _timed(self, function):  # noqa: ANN001, ANN202 - wraps the engine's own signature
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.lora += time.perf_counter() - started

        return call


def naive_loop(root: Path, evaluation: EvalConfig, seed: int, clock: Clock) -> int:
    """Reload the pipeline for every checkpoint; one image per call."""
    jobs = plan_jobs(read_candidates(root / "train"), evaluation, "t", seed)
    rendered, current, engine = 0, None, None
    for job in jobs:
        if (job.candidate, job.step) != current:
            engine = None  # the previous pipeline is freed before the next one loads
            clock.untimed(gc.collect)  # (an 860M pipeline twice may not fit; not counted)
            engine = clock.engine(root, evaluation, "exact")
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


def sweep(root: Path, evaluation: EvalConfig, seed: int, batch_mode: str, clock: Clock) -> int:
    engine = clock.engine(root, evaluation, batch_mode)
    out = root / f"sweep-{batch_mode}-{len(evaluation.seeds)}"
    result = run_sweep(engine, root / "train", evaluation, "t", 64, seed, out)
    return result.rendered


def report(name: str, images: int, clock: Clock, baseline: float) -> None:
    wall = clock.wall
    timer = clock.timer
    outside = max(wall - timer.unet - timer.vae, 0.0)
    rest = max(outside - clock.pipeline - clock.lora, 0.0)
    rate = images / wall
    print(
        f"{name:<22} {images:4d} img {wall:7.2f} s x{rate / baseline:5.2f}  "
        f"UNet {timer.unet / wall:5.1%} VAE {timer.vae / wall:5.1%} | outside {outside / wall:5.1%}"
        f" = pipeline load {clock.pipeline / wall:5.1%} + LoRA loads {clock.lora / wall:5.1%}"
        f" + rest {rest / wall:5.1%}   (load avg {os.getloadavg()[0]:.2f})"
    )


def measure(root: Path, evaluation: EvalConfig, label: str) -> None:
    print(f"\n{label}")
    clocks = {}
    for name, run in (
        ("naive (reload, 1/call)", lambda clock: naive_loop(root, evaluation, 1234, clock)),
        ("sweep exact", lambda clock: sweep(root, evaluation, 1234, "exact", clock)),
        ("sweep fused", lambda clock: sweep(root, evaluation, 1234, "fused", clock)),
    ):
        gc.collect()
        clock = Clock()
        started = time.perf_counter()
        images = run(clock)
        clock.wall = time.perf_counter() - started - clock.excluded
        clocks[name] = (images, clock)
    naive_images, naive = clocks["naive (reload, 1/call)"]
    baseline = naive_images / naive.wall
    for name, (images, clock) in clocks.items():
        assert images == naive_images
        report(name, images, clock, baseline)


def stage_batch_size() -> int:
    """eval.batch_size of the composed default config: what the generate stage renders with."""
    from charaforge.config import load_params

    return load_params(Path(__file__).resolve().parents[1] / "params.yaml").eval.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[2, 8, 24], help="seeds per prompt (24: ~the stage)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=stage_batch_size(),
        help="images per forward (default: the generate stage's, params.yaml eval.batch_size)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (as the demo)")
    parser.add_argument("--real-shape", action="store_true", help="SD1.5's real shapes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "No LoRA keys associated to CLIPTextModel", per load
    warnings.filterwarnings("ignore")
    print("load average at start (1, 5, 15 min):", os.getloadavg())
    prompts = ["t, standing", "t, sitting", "t, arms up"]
    scales = [0.0, 0.5, 1.0]
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        started = time.perf_counter()
        if args.real_shape:
            build_real_shape_workspace(root, 2)
            prompts, scales = prompts[:1], [0.0, 1.0]
        else:
            build_workspace(root, args.candidates)
        print(f"workspace built in {time.perf_counter() - started:.1f} s")
        # Warm-up: first calls pay for lazy imports and allocator growth.
        GenerationEngine(root / "base", device="cpu").render("warm", 0, steps=1)
        gc.collect()
        shape = "real-shaped SD1.5 (860M UNet)" if args.real_shape else "stand-in SD1.5"
        print(
            f"{shape}, 64 px, CPU, {args.threads} thread(s), {args.steps} steps, batch "
            f"{args.batch_size}; ratios against the naive loop of the same run"
        )
        for seeds in args.seeds:
            evaluation = EvalConfig(
                prompts=prompts,
                negative_prompt="lowres",
                seeds=list(range(seeds)),
                lora_scales=scales,
                steps=args.steps,
                guidance_scale=5.0,
                scheduler="euler",
                batch_size=args.batch_size,
            )
            measure(root, evaluation, f"{len(prompts)} prompt(s) x {seeds} seeds per cell")
    print("load average at end (1, 5, 15 min):", os.getloadavg())


if __name__ == "__main__":
    main()
