"""The world stage's library entry: pretrain every world model, two processes side by side.

With `model.source: world` the stage trains, in two spawned worker processes of one torch thread
each (torch with two threads on shared cores is ~25x slower than two one-thread processes):
  - the diffusion world model (VAE, then UNet + text encoder; `world_diffusion`), then a contact
    sheet of its generations;
  - the second data-parallel rank of the VAE phase (`world_parallel`), then the scorers: a CLIP,
    a WD14-format tagger and the attribute oracle (`world_scorers`), which train while the first
    process trains the UNet.
Everything under data/world is byte-identical from run to run; the run's timings, which are not,
go to reports/world.json (a DVC metric, not cached) and MLflow.

With any other model source the stage only writes data/world/world.json saying the world is not
used, so the stand-in pipeline never pays for pretraining.
"""

from __future__ import annotations

import csv
import functools
import importlib
import importlib.util
import io
import logging
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from charaforge.config import WorldConfig
from charaforge.core.files import atomic_path, derive_seed, write_json, write_png, write_text
from charaforge.core.logs import brief_metrics, configure_logging
from charaforge.models.base import set_cpu_threads, set_determinism
from charaforge.models.loading import WEIGHTS_LOADING_LOCK
from charaforge.models.world_common import RenderPool
from charaforge.models.world_diffusion import pretrain_diffusion, vae_peer
from charaforge.models.world_files import (
    CONTACT_SHEET,
    LOSSES_CSV,
    PIPELINE_DIR,
    WORLD_JSON,
    write_unused,
)
from charaforge.models.world_oracle import load_world_oracle, oracle_accuracy
from charaforge.prepare.world import (
    ATTRIBUTES,
    CHARACTER_ATTRIBUTES,
    DEMO_CHARACTER,
    Scene,
    caption,
    make_scene,
    sample_scenes,
)

log = logging.getLogger(__name__)

SCORERS_MODULE = "charaforge.models.world_scorers"
BASE_EVAL_BATCH = 25  # prompts per sampling loop when the oracle judges the base model
SHEET_CELL = 96  # contact-sheet cell side: 32 px images upscaled 3x (nearest) to be looked at


def world_description() -> dict[str, Any]:
    """The world's vocabulary and its held-out character, as world.json records them."""
    demo_scene = make_scene(**DEMO_CHARACTER, background=ATTRIBUTES["background"][0])
    return {
        "attributes": {name: list(values) for name, values in ATTRIBUTES.items()},
        "character_attributes": list(CHARACTER_ATTRIBUTES),
        "held_out_character": dict(DEMO_CHARACTER),
        "held_out_caption": caption(demo_scene),
    }


def _init_worker(threads: int) -> None:
    # A spawned process starts with fresh logging: the stage's set-up again (our format, other
    # libraries' notices dropped, tqdm repaints as lines when the log is not a terminal).
    configure_logging()
    set_cpu_threads(threads)
    set_determinism()


@torch.no_grad()
def contact_sheet(pipeline: Any, config: WorldConfig, seed: int) -> Image.Image:
    """Generations of the pretrained model: one row per sample prompt, one column per seed."""
    samples = config.samples
    _use_dpm_solver(pipeline)
    side = SHEET_CELL
    sheet = Image.new("RGB", (side * len(samples.seeds), side * len(samples.prompts)), "white")
    for row, prompt in enumerate(samples.prompts):
        for column, sample_seed in enumerate(samples.seeds):
            generator = torch.Generator("cpu").manual_seed(
                derive_seed(seed, "world", "sample", sample_seed)
            )
            image = pipeline(
                prompt,
                num_inference_steps=samples.steps,
                guidance_scale=samples.guidance_scale,
                height=config.image_size,
                width=config.image_size,
                generator=generator,
            ).images[0]
            cell = image.resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(cell, (column * side, row * side))
    return sheet


def _use_dpm_solver(pipeline: Any) -> None:
    from diffusers import DPMSolverMultistepScheduler

    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
        pipeline.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )


@functools.cache
def _saved_pipeline(folder: str) -> Any:
    """The saved world pipeline, loaded once per worker process (the finishing jobs share it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading the five small components takes a second; their progress bars, and those of the
    # sheet's and the evaluation's sampling loops, are only noise in the stage's log.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with WEIGHTS_LOADING_LOCK:
        pipeline = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def base_eval_scenes(config: WorldConfig, seed: int) -> list[Scene]:
    """The combinations seen in pretraining (never the demo character) the oracle judges."""
    return sample_scenes(derive_seed(seed, "world", "base-eval"), config.samples.eval_images)


@torch.no_grad()
def base_eval_chunk(config: WorldConfig, out_dir: Path, seed: int, start: int) -> np.ndarray:
    """Worker: the base model's generations for base-eval prompts [start, start + BASE_EVAL_BATCH),
    DPM-Solver++ as the contact sheet; one sampling loop, so the bytes do not depend on which
    worker draws which chunk."""
    samples = config.samples
    pipeline = _saved_pipeline(str(out_dir / PIPELINE_DIR))
    _use_dpm_solver(pipeline)
    scenes = base_eval_scenes(config, seed)[start : start + BASE_EVAL_BATCH]
    generators = [
        torch.Generator("cpu").manual_seed(derive_seed(seed, "world", "base-eval", index))
        for index in range(start, start + len(scenes))
    ]
    images = pipeline(
        [caption(scene) for scene in scenes],
        num_inference_steps=samples.steps,
        guidance_scale=samples.guidance_scale,
        height=config.image_size,
        width=config.image_size,
        generator=generators,
    ).images
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def sheet_job(config: WorldConfig, out_dir: Path, seed: int) -> dict[str, float]:
    """Worker: the contact sheet of the saved pipeline; its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    pipeline = _saved_pipeline(str(out_dir / PIPELINE_DIR))
    write_png(out_dir / CONTACT_SHEET, contact_sheet(pipeline, config, seed))
    return {
        "seconds": round(time.perf_counter() - wall, 3),
        "cpu_seconds": round(time.process_time() - cpu, 3),
    }


def base_model_accuracy(
    chunks: Sequence[np.ndarray], oracle_dir: Path, config: WorldConfig, seed: int
) -> dict:
    """The oracle's verdict on the base model's generations (`base_eval_chunk`s, in order)."""
    scenes = base_eval_scenes(config, seed)
    pool = RenderPool(scenes, np.concatenate(chunks))
    judged = oracle_accuracy(load_world_oracle(oracle_dir), pool)
    # oracle_accuracy_<attribute> / oracle_all_right, named for what was judged: the base model.
    metrics = {key.replace("oracle_", "base_", 1): value for key, value in judged.items()}
    metrics["base_eval_images"] = len(scenes)
    return metrics


def diffusion_job(
    config: WorldConfig, out_dir: Path, seed: int, rendezvous: str | None
) -> dict[str, Any]:
    """Worker: pretrain the diffusion model (rank 0 of the VAE phase) and save it."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    _, result = pretrain_diffusion(config, out_dir / PIPELINE_DIR, seed, rendezvous=rendezvous)
    result.seconds["total"] = round(time.perf_counter() - start_wall, 3)
    result.cpu_seconds["total"] = round(time.process_time() - start_cpu, 3)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "step", "loss"])
    for model, losses in (("vae", result.vae_losses), ("unet", result.unet_losses)):
        writer.writerows((model, step, f"{loss:.6g}") for step, loss in enumerate(losses))
    write_text(out_dir / LOSSES_CSV, buffer.getvalue())
    return {
        **result.summary(),
        "vae_losses": result.vae_losses,
        "unet_losses": result.unet_losses,
    }


def scorers_available() -> bool:
    return importlib.util.find_spec(SCORERS_MODULE) is not None


def scorers_job(
    config: WorldConfig, out_dir: Path, seed: int, rendezvous: str | None
) -> dict[str, Any]:
    """Worker: rank 1 of the data-parallel VAE phase, then the CLIP scorer, WD14-format tagger
    and oracle (world_scorers, built beside us)."""
    timing = {}
    if rendezvous is not None:
        peer_wall, peer_cpu = time.perf_counter(), time.process_time()
        vae_peer(config, seed, rendezvous, rank=1)
        timing["vae_peer_seconds"] = round(time.perf_counter() - peer_wall, 3)
        timing["vae_peer_cpu_seconds"] = round(time.process_time() - peer_cpu, 3)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    # Looked up by name so this stage runs before that module exists; a plain import once it has.
    module = importlib.import_module(SCORERS_MODULE)
    metrics = module.train_world_scorers(config, out_dir, seed)
    timing["seconds"] = round(time.perf_counter() - start_wall, 3)
    timing["cpu_seconds"] = round(time.process_time() - start_cpu, 3)
    return {"metrics": metrics, "timing": timing}


@contextmanager
def _worker_pool(processes: int, threads: int | None) -> Iterator[Any]:
    """Spawned one-thread worker processes, kept for both rounds of the stage's jobs."""
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(processes, initializer=_init_worker, initargs=(threads,))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    # Let the workers exit on their own: terminated, they skip their exit handlers, and the
    # semaphore of tqdm's lock in each is reported leaked.
    pool.close()
    pool.join()


def _side_by_side(pool: Any, jobs: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]) -> dict:
    """Run every job on the pool, in the order given; the first failure stops the others (a
    rank of the VAE phase would otherwise wait for its dead peer)."""
    pending = {name: pool.apply_async(job, args) for name, (job, args) in jobs.items()}
    while not all(result.ready() for result in pending.values()):
        for result in pending.values():
            if result.ready() and not result.successful():
                result.get()  # raises the worker's exception; _worker_pool terminates the rest
        time.sleep(0.2)
    return {name: result.get() for name, result in pending.items()}


def _is_timing(key: str) -> bool:
    # The scorers name every timing `<...>_seconds`; the diffusion summary `seconds`/`cpu_seconds`.
    return key == "seconds" or key.endswith("_seconds")


def _deterministic(summary: dict[str, Any]) -> dict[str, Any]:
    """The parts of a worker's summary that are the same on every run (no timings)."""
    return {key: value for key, value in summary.items() if not _is_timing(key)}


def _timings(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in summary.items() if _is_timing(key)}


def train_world(
    config: WorldConfig, out_dir: str | Path, seed: int, model_source: str = "world"
) -> dict[str, Any]:
    """Build data/world. Returns world.json's content plus the (non-deterministic) timings."""
    if model_source != "world":
        return {**write_unused(out_dir, model_source), "timings": {}}
    jobs = {"diffusion": diffusion_job}
    if scorers_available():
        jobs["scorers"] = scorers_job
    else:
        log.warning("%s not found: training the diffusion world model only", SCORERS_MODULE)
    start_wall = time.perf_counter()
    with atomic_path(out_dir) as temp, tempfile.TemporaryDirectory() as meeting:
        temp.mkdir(parents=True)
        # The VAE phase is data-parallel over both workers when both run (world_parallel); the
        # rank count is fixed, so the bytes never depend on the machine.
        rendezvous = str(Path(meeting) / "vae-rendezvous") if "scorers" in jobs else None
        arguments = (config, temp, seed, rendezvous)
        with _worker_pool(len(jobs), config.cpu_threads) as pool:
            results = _side_by_side(pool, {name: (job, arguments) for name, job in jobs.items()})
            diffusion = results["diffusion"]
            scorers = results.get("scorers")
            # Then the saved pipeline's contact sheet and, with the oracle trained, the base
            # model's evaluation in chunks, spread over both workers (their imports are done).
            watch = time.perf_counter()
            finishing: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
                "sheet": (sheet_job, (config, temp, seed))
            }
            if scorers is not None:
                for start in range(0, config.samples.eval_images, BASE_EVAL_BATCH):
                    finishing[f"base-{start}"] = (base_eval_chunk, (config, temp, seed, start))
            finished = _side_by_side(pool, finishing)
        diffusion["seconds"]["samples"] = finished["sheet"]["seconds"]
        diffusion["cpu_seconds"]["samples"] = finished["sheet"]["cpu_seconds"]
        if scorers is not None:
            chunks = [value for name, value in finished.items() if name.startswith("base-")]
            diffusion.update(base_model_accuracy(chunks, temp / "oracle", config, seed))
            diffusion["base_eval_seconds"] = round(time.perf_counter() - watch, 3)
            verdict = {
                key: value
                for key, value in diffusion.items()
                if key.startswith("base_") and not key.endswith("_seconds")
            }
            log.info("world base model (oracle): %s", brief_metrics(verdict, "base_"))
        payload = {
            "used": True,
            **world_description(),
            "settings": config.model_dump(mode="json"),
            "seed": seed,
            "diffusion": _deterministic(
                {k: v for k, v in diffusion.items() if not k.endswith("_losses")}
            ),
            "scorers": _deterministic(scorers["metrics"]) if scorers else None,
            "files": {"pipeline": PIPELINE_DIR, "losses": LOSSES_CSV, "samples": CONTACT_SHEET},
        }
        write_json(temp / WORLD_JSON, payload)
    timings = {
        "stage_seconds": round(time.perf_counter() - start_wall, 3),
        "diffusion_seconds": diffusion["seconds"],
        "diffusion_cpu_seconds": diffusion["cpu_seconds"],
        "base_eval_seconds": diffusion.get("base_eval_seconds"),
        "scorers": {**scorers["timing"], **_timings(scorers["metrics"])} if scorers else None,
    }
    return {
        **payload,
        "timings": timings,
        "vae_losses": diffusion["vae_losses"],
        "unet_losses": diffusion["unet_losses"],
    }
