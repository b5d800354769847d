"""A fresh validation of one LoRA on request (`POST /api/v1/eval/report`).

The evaluation sweep's fixed prompts and seeds (`eval.prompts`, with `eval.from_data`'s) and its
pose conditions (the pose stage's skeletons through the pose ControlNet, `eval.pose`) are planned
by the sweep's own code (generate.sweep.plan_jobs: same prompt numbering, same generator seeds),
rendered for that one LoRA at one scale on the server's device queue (the worker that renders
every other route), written under the outputs folder, and scored there by the score stage's own
scorers (evaluate.sweep.score_sweep) against the dataset's reference images. Nothing is cached:
every request renders and scores anew, so a LoRA file that changed is judged as it is now.

Pose conditions are rendered only where the engine has a ControlNet of that type (a stand-in
base builds one; a real base needs `eval.controlnets`): otherwise they are left out, and the
answer says so.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from charaforge.config import Params, load_params
from charaforge.core.files import sha256_bytes, write_parquet
from charaforge.errors import CharaForgeError, ConfigError
from charaforge.evaluate.columns import METRIC_COLUMNS
from charaforge.evaluate.sweep import SCORERS_FILE, score_sweep
from charaforge.generate import data_prompts
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import write_image
from charaforge.generate.request import RenderRequest
from charaforge.generate.sweep import (
    SweepJob,
    index_of,
    job_conditioning,
    job_request,
    plan_jobs,
)
from charaforge.generate.sweep_controls import PoseCondition, condition_maps, pose_conditions
from charaforge.serve.limits import ServerSettings, check_cost
from charaforge.serve.registry import RegisteredLora

VALIDATION_DIR = "eval"  # under <outputs>/<date>/


class ValidationUnavailable(RuntimeError):
    """The server was started without the project's params (or they do not validate)."""


@dataclass
class ValidationPlan:
    """One LoRA's fixed validation: the sweep's jobs, their requests, where they are written."""

    lora: str
    scale: float
    jobs: list[SweepJob]
    requests: list[RenderRequest]
    folder: Path
    params: Params
    skipped: list[str] = field(default_factory=list)


def load_setup(settings: ServerSettings) -> Params:
    """The project's params (read on every request, so an edited params.yaml is used)."""
    if settings.params_file is None:
        raise ValidationUnavailable(
            "no params.yaml: start the server in the project folder for fresh validations"
        )
    try:
        return load_params(settings.params_file)
    except ConfigError as error:
        raise ValidationUnavailable(str(error).splitlines()[0][:300]) from None


def plan_validation(
    settings: ServerSettings,
    params: Params,
    entry: RegisteredLora,
    scale: float,
    out_root: Path,
    with_pose: bool = True,
) -> ValidationPlan:
    """The fixed prompts (and pose conditions) for `entry` at `scale`; ValueError when the
    validation exceeds the server's limits or has nothing to render."""
    eval_config = data_prompts.resolve_prompts(params.eval, settings.dataset_dir)
    # Only the fixed prompts and the pose conditions: suites need their own group scorers.
    eval_config = eval_config.model_copy(update={"suites": {}, "lora_scales": [scale]})
    skipped: list[str] = []
    poses: list[PoseCondition] = []
    if with_pose and eval_config.pose.enabled:
        try:
            poses = pose_conditions(eval_config, settings.pose_dir, settings.ingest_dir)
        except ConfigError as error:
            skipped.append(f"pose: {error}")
    candidate, _, step = entry.name.partition("@")
    label = {"name": candidate, "checkpoints": [int(step) if step.isdigit() else 0]}
    jobs = plan_jobs([label], eval_config, params.data.trigger, params.seed, poses)
    if not jobs:
        raise ValueError("eval: the project's params name no validation prompt (eval.prompts)")
    resolution = params.model.resolution
    problems = check_cost(
        settings, resolution, resolution, eval_config.steps, min(len(jobs), settings.max_batch)
    )
    if problems:
        raise ValueError("; ".join(problems))
    key = sha256_bytes(f"{entry.name}|{entry.file}|{scale:g}|{with_pose}".encode())[:16]
    folder = out_root / time.strftime("%Y-%m-%d") / VALIDATION_DIR / key
    # The maps made from photos (control types other than openpose) go to folder/controls/.
    maps = condition_maps([job.pose for job in jobs if job.pose is not None], eval_config, folder)
    loras = {entry.name: scale} if scale > 0 else {}
    requests = [
        job_request(job, loras, eval_config, resolution, job_conditioning(job, maps, eval_config))
        for job in jobs
    ]
    return ValidationPlan(entry.name, scale, jobs, requests, folder, params, skipped)


def _has_controlnet(engine: GenerationEngine, control_type: str) -> bool:
    try:
        engine.controlnet(control_type)
    except ConfigError:
        return False
    return True


def validation_work(
    settings: ServerSettings, plan: ValidationPlan, result: dict[str, Any]
) -> Callable[[GenerationEngine], list[Image.Image]]:
    """The queued job's work: render the plan in batches that share a conditioning, write the
    images, score them; the scores land in `result` (the worker returns the images)."""

    def work(engine: GenerationEngine) -> list[Image.Image]:
        rendered: list[tuple[SweepJob, Image.Image]] = []
        cells: dict[Any, list[int]] = {}
        for position, job in enumerate(plan.jobs):
            cells.setdefault(job.pose, []).append(position)
        for pose, positions in cells.items():
            if pose is not None and not _has_controlnet(engine, pose.control_type):
                plan.skipped.append(
                    f"pose {pose.image_id}: no {pose.control_type} ControlNet on this server"
                )
                continue
            for start in range(0, len(positions), settings.max_batch):
                chunk = positions[start : start + settings.max_batch]
                images = engine.render_batch([plan.requests[p] for p in chunk])
                for position, image in zip(chunk, images, strict=True):
                    job = plan.jobs[position]
                    write_image(plan.folder / job.relative_path(), image)
                    rendered.append((job, image))
        jobs = [job for job, _ in rendered]
        index = index_of(jobs, plan.folder)
        write_parquet(plan.folder / "index.parquet", index)
        params = plan.params
        # The score stage's scorers as configured, without its side outputs (the consistency
        # filter's copies, the world oracle's ground truth).
        score_config = params.score.model_copy(
            update={"filter": params.score.filter.model_copy(update={"enabled": False})}
        )
        score_config = score_config.model_copy(update={"oracle": None})
        try:
            scores = score_sweep(
                plan.folder,
                settings.dataset_dir,
                score_config,
                params.data.trigger,
                plan.folder / "score",
                pose_dir=settings.pose_dir,
                pose_config=params.pose,
                tagger_config=params.tagger,
            )
        except CharaForgeError as error:
            raise ValueError(str(error)) from None
        result["scores"] = scores
        return [image for _, image in rendered]

    return work


def _number(value: Any) -> float | None:
    if value is None or pd.isna(value):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def validation_answer(plan: ValidationPlan, scores: pd.DataFrame) -> dict[str, Any]:
    """The response: per image its path, prompt, seed, pose and every metric; per metric the
    mean over the images it applies to (None where it applies to none); the scorers used."""
    images = []
    for row in scores.itertuples(index=False):
        path = Path(row.image_path)
        images.append(
            {
                "image_path": str(path.resolve()),
                "metadata_path": str(path.with_suffix(".json").resolve()),
                "prompt": row.prompt,
                "seed": int(row.seed),
                "pose_image_id": None if pd.isna(row.pose_image_id) else row.pose_image_id,
                "control_type": None if pd.isna(row.control_type) else row.control_type,
                "scores": {name: _number(getattr(row, name)) for name in METRIC_COLUMNS},
            }
        )
    means = {}
    for name in METRIC_COLUMNS:
        values = pd.to_numeric(scores[name], errors="coerce").dropna()
        means[name] = float(values.mean()) if len(values) else None
    scorers = json.loads((plan.folder / "score" / SCORERS_FILE).read_text(encoding="utf-8"))
    return {
        "lora_id": plan.lora,
        "lora_scale": plan.scale,
        "folder": str(plan.folder.resolve()),
        "images": images,
        "means": means,
        "scorers": scorers,
        "skipped": plan.skipped,
    }
