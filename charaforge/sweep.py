"""The evaluation sweep: candidates x checkpoints x LoRA scales x prompts x seeds.

Scale 0 is the base model whatever the LoRA, so it is rendered once, as candidate `base` at step
0. Every candidate uses the same generator seed for a given (prompt, sample), so images differ
only by the LoRA: the comparison is paired. A rerun skips images whose PNG exists and whose
sidecar holds the very parameters it would render with (resume after an interruption).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from charaforge.config import ConfigError, EvalConfig
from charaforge.engine import GenerationEngine, adapter_name, read_sidecar, write_image
from charaforge.io import derive_seed, sha256_file, write_parquet
from charaforge.train import checkpoint_path

log = logging.getLogger(__name__)

BASE_CANDIDATE = "base"
INDEX_COLUMNS = [
    "image_id",
    "image_path",
    "candidate",
    "step",
    "lora_scale",
    "prompt_index",
    "prompt",
    "seed",
]


@dataclass(frozen=True)
class SweepJob:
    candidate: str
    step: int
    lora_scale: float
    prompt_index: int
    prompt: str
    sample: int  # the entry of eval.seeds
    seed: int  # the generator seed actually used

    def relative_path(self) -> str:
        return (
            f"images/{self.candidate}/step-{self.step:06d}/scale-{self.lora_scale:g}/"
            f"p{self.prompt_index:02d}_s{self.sample}.png"
        )


@dataclass
class SweepResult:
    index: pd.DataFrame
    rendered: int
    skipped: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds > 0 else 0.0


def image_seed(seed: int, prompt_index: int, sample: int) -> int:
    """Independent of the candidate, so every candidate starts from the same noise."""
    return derive_seed(seed, "generate", prompt_index, sample)


def read_candidates(train_dir: str | Path) -> list[dict]:
    summary = Path(train_dir) / "summary.json"
    if not summary.is_file():
        raise ConfigError(f"{summary}: not found (run the `train` stage first)")
    candidates = json.loads(summary.read_text(encoding="utf-8"))["candidates"]
    if any(candidate["name"] == BASE_CANDIDATE for candidate in candidates):
        raise ConfigError(f"train.candidates: the name {BASE_CANDIDATE!r} is reserved")
    return candidates


def plan_jobs(candidates: list[dict], eval: EvalConfig, trigger: str, seed: int) -> list[SweepJob]:
    """Every image of the sweep, in rendering order (one LoRA load per checkpoint)."""
    prompts = [prompt.replace("{trigger}", trigger) for prompt in eval.prompts]
    scales = sorted(set(eval.lora_scales))
    if any(scale < 0 for scale in scales):
        raise ConfigError(f"eval.lora_scales: must be >= 0, got {eval.lora_scales}")

    def grid(candidate: str, step: int, scale: float) -> list[SweepJob]:
        return [
            SweepJob(candidate, step, scale, index, prompt, sample, image_seed(seed, index, sample))
            for index, prompt in enumerate(prompts)
            for sample in eval.seeds
        ]

    jobs = grid(BASE_CANDIDATE, 0, 0.0) if 0.0 in scales else []
    for candidate in candidates:
        for step in candidate["checkpoints"]:
            for scale in (scale for scale in scales if scale > 0):
                jobs += grid(candidate["name"], step, scale)
    return jobs


def run_sweep(
    engine: GenerationEngine,
    train_dir: str | Path,
    eval: EvalConfig,
    trigger: str,
    resolution: int,
    seed: int,
    out_dir: str | Path = "data/generate",
) -> SweepResult:
    """Render the sweep into out_dir/images and write out_dir/index.parquet."""
    out_dir = Path(out_dir)
    jobs = plan_jobs(read_candidates(train_dir), eval, trigger, seed)
    engine.set_scheduler(eval.scheduler)
    rows, rendered, skipped = [], 0, 0
    loaded: str | None = None
    started = time.perf_counter()
    for job in tqdm(jobs, desc="generate", leave=False):
        path = out_dir / job.relative_path()
        loras = {}
        if job.candidate != BASE_CANDIDATE:
            name = adapter_name(f"{job.candidate}-{job.step}")
            if loaded != name:
                _release(engine, loaded)
                engine.load_lora(name, checkpoint_path(Path(train_dir) / job.candidate, job.step))
                loaded = name
            loras = {name: job.lora_scale}
        request = {
            "prompt": job.prompt,
            "seed": job.seed,
            "loras": loras,
            "steps": eval.steps,
            "guidance_scale": eval.guidance_scale,
            "negative_prompt": eval.negative_prompt,
            "width": resolution,
            "height": resolution,
        }
        if path.is_file() and read_sidecar(path) == engine.parameters(**request):
            skipped += 1
        else:
            write_image(path, engine.render(**request))
            rendered += 1
        rows.append(
            {
                "image_id": sha256_file(path)[:16],
                "image_path": (out_dir / job.relative_path()).as_posix(),
                "candidate": job.candidate,
                "step": job.step,
                "lora_scale": job.lora_scale,
                "prompt_index": job.prompt_index,
                "prompt": job.prompt,
                "seed": job.seed,
            }
        )
    _release(engine, loaded)
    seconds = time.perf_counter() - started
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS).astype(
        {"step": "int64", "lora_scale": "float64", "prompt_index": "int64", "seed": "int64"}
    )
    write_parquet(out_dir / "index.parquet", index)
    log.info(
        "sweep: %d images (%d rendered, %d reused) in %.1f s", len(rows), rendered, skipped, seconds
    )
    return SweepResult(index=index, rendered=rendered, skipped=skipped, seconds=seconds)


def _release(engine: GenerationEngine, name: str | None) -> None:
    if name is not None and name in engine.loras:
        engine.unload_lora(name)
