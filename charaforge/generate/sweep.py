"""The evaluation sweep: candidates x checkpoints x LoRA scales x prompts x seeds (x poses x
control types, x suite methods).

Prompts are `eval.prompts` plus the CharaConsist suites (`eval.suites`), numbered together by
`prompt_index`. Pose conditions render chosen prompts once more through a ControlNet reading a
skeleton of the pose stage (and, per `eval.pose.control_types`, through other ControlNets
reading maps of the person's photo: generate.sweep_controls). A suite whose `method` is a list
renders once per method. Scale 0 is the base model whatever the LoRA, so it is rendered once,
as candidate `base` at step 0. Every candidate uses the same generator seed for a given (prompt,
sample), so images differ only by the LoRA: the comparison is paired.

Jobs that share a LoRA cell and a conditioning render in batches (`eval.batch_size`); every image
is byte-identical to its single render, so batching never changes the result. A rerun skips
images whose PNG exists and whose sidecar holds the very parameters it would render with; each
file is written atomically (sidecar first), so an interrupted sweep resumes with no half-written
file and renders only what is missing.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Protocol

import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from charaforge.config import EvalConfig
from charaforge.core import layout
from charaforge.core.contracts import SWEEP_CONDITION_COLUMNS, SWEEP_INDEX_COLUMNS
from charaforge.core.files import derive_seed, sha256_file, write_parquet, write_png
from charaforge.core.layout import BASE_CANDIDATE, checkpoint_path
from charaforge.errors import MissingInputError
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.loras import adapter_name
from charaforge.generate.prompts import read_suite
from charaforge.generate.request import Conditioning, Consistency, ImagePrompt, RenderRequest
from charaforge.generate.sweep_controls import PoseCondition, condition_maps, pose_conditions
from charaforge.generate.sweep_methods import render_cell

log = logging.getLogger(__name__)

INDEX_COLUMNS = [*SWEEP_INDEX_COLUMNS, *SWEEP_CONDITION_COLUMNS]
GRID_DIR = "grids"


@dataclass(frozen=True)
class SweepPrompt:
    index: int
    text: str
    seeds: tuple[int, ...]  # entries of eval.seeds (or the suite's seeds)
    suite: str | None = None
    group: int | None = None
    identity_shot: bool = False
    character: str | None = None  # a suite line's character field (trigger filled in)
    methods: tuple[str, ...] = ("independent",)  # the suite's method axis


@dataclass(frozen=True)
class SweepJob:
    candidate: str
    step: int
    lora_scale: float
    prompt: SweepPrompt
    sample: int  # the entry of eval.seeds
    seed: int  # the generator seed actually used
    pose: PoseCondition | None = None
    method: str = "independent"  # how a suite group keeps its character (sweep_methods)

    @property
    def prompt_index(self) -> int:
        return self.prompt.index

    def relative_path(self) -> str:
        pose = self.pose.suffix() if self.pose else ""
        # A one-method suite keeps the file name it always had; an axis names the method.
        method = f"_m-{self.method}" if len(self.prompt.methods) > 1 else ""
        return (
            f"images/{self.candidate}/step-{self.step:06d}/scale-{self.lora_scale:g}/"
            f"p{self.prompt.index:02d}_s{self.sample}{pose}{method}.png"
        )

    def cell(self) -> tuple:
        """Jobs of one cell share LoRA state and conditioning: they can share a batch."""
        return (self.candidate, self.step, self.lora_scale, self.pose)


@dataclass
class SweepResult:
    index: pd.DataFrame
    rendered: int
    skipped: int
    seconds: float
    grids: list[Path] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds > 0 else 0.0


def image_seed(seed: int, prompt_index: int, sample: int) -> int:
    """Independent of the candidate, so every candidate starts from the same noise."""
    return derive_seed(seed, "generate", prompt_index, sample)


def read_candidates(train_dir: str | Path) -> list[dict]:
    summary = Path(train_dir) / "summary.json"
    if not summary.is_file():
        raise MissingInputError(f"{summary}: not found (run the `train` stage first)")
    candidates = json.loads(summary.read_text(encoding="utf-8"))["candidates"]
    return candidates


def sweep_prompts(eval: EvalConfig, trigger: str, root: str | Path = ".") -> list[SweepPrompt]:
    """eval.prompts, then each suite's prompts (suites in name order), numbered together."""
    prompts = [
        SweepPrompt(index, text.replace("{trigger}", trigger), tuple(eval.seeds))
        for index, text in enumerate(eval.prompts)
    ]
    for name, suite in sorted(eval.suites.items()):
        for item in read_suite(Path(root) / suite.file, name):
            if suite.max_groups is not None and item.group >= suite.max_groups:
                continue
            prompts.append(
                SweepPrompt(
                    len(prompts),
                    item.text(trigger),
                    tuple(suite.seeds),
                    suite=name,
                    group=item.group,
                    identity_shot=item.identity_shot,
                    character=item.character.replace("{trigger}", trigger),
                    methods=suite.methods,
                )
            )
    return prompts


def plan_jobs(
    candidates: list[dict],
    eval: EvalConfig,
    trigger: str,
    seed: int,
    poses: list[PoseCondition] | None = None,
    root: str | Path = ".",
) -> list[SweepJob]:
    """Every image of the sweep, in rendering order (one LoRA load per checkpoint)."""
    prompts = sweep_prompts(eval, trigger, root)
    scales = sorted(set(eval.lora_scales))  # the schema keeps them >= 0
    # Only with poses: the pose prompts may be eval.from_data's, which the stage resolves first.
    pose_prompts = [prompts[index] for index in eval.pose.prompt_indices] if poses else []

    def grid(candidate: str, step: int, scale: float) -> list[SweepJob]:
        # Every method of a suite gets the same generator seed: the methods are paired.
        jobs = [
            SweepJob(
                candidate,
                step,
                scale,
                prompt,
                sample,
                image_seed(seed, prompt.index, sample),
                method=method,
            )
            for prompt in prompts
            for method in prompt.methods
            for sample in prompt.seeds
        ]
        jobs += [
            SweepJob(
                candidate,
                step,
                scale,
                prompt,
                sample,
                image_seed(seed, prompt.index, sample),
                pose,
            )
            for pose in poses or []
            for prompt in pose_prompts
            for sample in eval.pose.seeds
        ]
        return jobs

    jobs = grid(BASE_CANDIDATE, 0, 0.0) if 0.0 in scales else []
    for candidate in candidates:
        for step in candidate["checkpoints"]:
            for scale in (scale for scale in scales if scale > 0):
                jobs += grid(candidate["name"], step, scale)
    return jobs


class SweepExecutor(Protocol):
    """Renders work items (sweep jobs) into out_dir: in this process, on Ray actors, or in the
    processes of an `accelerate launch`. Any split of the items gives the same files: each
    image's bytes depend only on its own job, each file is written atomically, and an image
    already on disk with its parameters is not rendered again."""

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        """Render the jobs; return (rendered, skipped)."""
        ...


@dataclass(frozen=True)
class SweepWork:
    """Everything a worker needs to render any share of the sweep's jobs (picklable)."""

    train_dir: str
    eval: EvalConfig
    resolution: int
    out_dir: str
    # Where each image is also kept as it is rendered (run_sweep's work_dir), or None.
    keep_dir: str | None = None


class InProcessExecutor:
    """The default: every job here, in plan order, on the given engine."""

    def __init__(self, engine: GenerationEngine, on_image: Callable[[SweepJob], None] | None):
        self.engine, self.on_image = engine, on_image

    def render(self, jobs: list[SweepJob], work: SweepWork) -> tuple[int, int]:
        return render_jobs(self.engine, jobs, work, self.on_image)


def run_sweep(
    engine: GenerationEngine | None,
    train_dir: str | Path,
    eval: EvalConfig,
    trigger: str,
    resolution: int,
    seed: int,
    out_dir: str | Path = layout.GENERATE_DIR,
    pose_dir: str | Path | None = None,
    root: str | Path = ".",
    on_image: Callable[[SweepJob], None] | None = None,
    ingest_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    executor: SweepExecutor | None = None,
    stand_in: bool | None = None,
) -> SweepResult:
    """Render the sweep into out_dir/images, write out_dir/index.parquet and out_dir/grids/.

    `executor` renders the work items (default: in this process on `engine`); the index and
    the grids are then built here from the plan, in plan order, so they do not depend on who
    rendered what. `on_image` is called after each image is on disk (in-process only;
    progress, and tests interrupt through it). `stand_in` labels the grids (default: the
    engine's base). `work_dir`: a folder outside the stage's output (DVC deletes data/generate
    before it runs the stage again) where every image is kept as it is rendered, so that an
    interrupted sweep resumes inside `dvc repro` too; removed once the sweep is complete.
    """
    out_dir = Path(out_dir)
    jobs = sweep_work_items(train_dir, eval, trigger, seed, pose_dir, root, ingest_dir)
    keep_dir = str(work_dir) if work_dir is not None else None
    work = SweepWork(str(train_dir), eval, resolution, str(out_dir), keep_dir)
    if executor is None:
        if engine is None:
            raise ValueError("run_sweep: give an engine or an executor")
        executor = InProcessExecutor(engine, on_image)
    started = time.perf_counter()
    rendered, skipped = executor.render(jobs, work)
    seconds = time.perf_counter() - started
    index = _index(jobs, out_dir)
    if stand_in is None:
        stand_in = engine.base.stand_in if engine is not None else False
    grids: list[Path] = []
    if getattr(executor, "writes_outputs", True):  # the main one of N processes
        write_parquet(out_dir / "index.parquet", index)
        grids = write_contact_sheets(index, eval, out_dir, stand_in=stand_in)
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)  # complete: nothing left to resume
    log.info(
        "sweep: %d images (%d rendered, %d reused) in %.1f s", len(jobs), rendered, skipped, seconds
    )
    return SweepResult(index, rendered, skipped, seconds, grids)


def sweep_work_items(
    train_dir: str | Path,
    eval: EvalConfig,
    trigger: str,
    seed: int,
    pose_dir: str | Path | None = None,
    root: str | Path = ".",
    ingest_dir: str | Path | None = None,
) -> list[SweepJob]:
    """The sweep's work items in plan order, each keyed by its (candidate, step, scale,
    prompt, seed, pose, control type, method) and rendered to its own file
    (`SweepJob.relative_path`)."""
    poses = pose_conditions(eval, pose_dir, ingest_dir)
    return plan_jobs(read_candidates(train_dir), eval, trigger, seed, poses, root)


def shard_by_cell(jobs: list[SweepJob], shards: int) -> list[list[SweepJob]]:
    """Deterministic shares for `shards` workers: whole cells (one LoRA load each), dealt in
    plan order to the least-loaded share (ties: the lowest index)."""
    shares: list[list[SweepJob]] = [[] for _ in range(shards)]
    for cell_jobs in _cells(jobs):
        smallest = min(range(shards), key=lambda index: (len(shares[index]), index))
        shares[smallest].extend(cell_jobs)
    return shares


def render_jobs(
    engine: GenerationEngine,
    jobs: list[SweepJob],
    work: SweepWork,
    on_image: Callable[[SweepJob], None] | None = None,
    keep_lora: bool = False,
) -> tuple[int, int]:
    """Render `jobs` (any share of the sweep, in its order) on `engine`; (rendered, skipped).
    `keep_lora` (units pulled by a worker): the last LoRA stays loaded for the next call."""
    eval, resolution, out_dir = work.eval, work.resolution, Path(work.out_dir)
    train_dir = Path(work.train_dir)
    skeletons = condition_maps([job.pose for job in jobs if job.pose is not None], eval, out_dir)
    counts = [0, 0]  # rendered, reused
    kept_dir = Path(work.keep_dir) if work.keep_dir is not None else None
    loaded: str | None = next(iter(engine.loras), None) if keep_lora else None
    progress = tqdm(total=len(jobs), desc="generate", leave=False)

    def done(job: SweepJob, was_rendered: bool) -> None:
        counts[0 if was_rendered else 1] += 1
        progress.update(1)
        if was_rendered and on_image is not None:
            on_image(job)

    for cell_jobs in _cells(jobs):
        first = cell_jobs[0]
        name = None
        if first.candidate != BASE_CANDIDATE:
            name = adapter_name(f"{first.candidate}-{first.step}")
        if loaded != name:
            if name is None:
                _release(engine, loaded)
            else:  # the checkpoint's weights into the last one's peft layers where they fit
                lora = checkpoint_path(train_dir / first.candidate, first.step)
                engine.swap_lora(loaded, name, lora)
            loaded = name
        loras = {name: first.lora_scale} if name is not None else {}
        conditioning = job_conditioning(first, skeletons, eval)

        def make_request(
            job: SweepJob,
            consistency: Consistency | None,
            image_prompt: ImagePrompt | None,
            loras: dict[str, float] = loras,
            conditioning: Conditioning | None = conditioning,
        ) -> RenderRequest:
            return job_request(
                job, loras, eval, resolution, conditioning, consistency, image_prompt
            )

        render_cell(engine, cell_jobs, make_request, eval, out_dir, done, kept_dir)
    progress.close()
    if not keep_lora:
        _release(engine, loaded)
    return counts[0], counts[1]


def _cells(jobs: list[SweepJob]) -> list[list[SweepJob]]:
    return [list(cell) for _, cell in groupby(jobs, key=SweepJob.cell)]


def job_conditioning(
    job: SweepJob, maps: dict[PoseCondition, Image.Image], eval: EvalConfig
) -> Conditioning | None:
    """The ControlNet conditioning of a pose-conditioned job (its map from `condition_maps`)."""
    if job.pose is None:
        return None
    return Conditioning(
        "control",
        maps[job.pose],
        control_type=job.pose.control_type,
        conditioning_scale=eval.pose.conditioning_scale,
        source=job.pose.image_id,
    )


def job_request(
    job: SweepJob,
    loras: dict[str, float],
    eval: EvalConfig,
    resolution: int,
    conditioning: Conditioning | None,
    consistency: Consistency | None = None,
    image_prompt: ImagePrompt | None = None,
) -> RenderRequest:
    """The request that renders a sweep job (the sweep, and a served validation of one LoRA)."""
    return RenderRequest(
        prompt=job.prompt.text,
        seed=job.seed,
        loras=loras,
        steps=eval.steps,
        guidance_scale=eval.guidance_scale,
        negative_prompt=eval.negative_prompt,
        width=resolution,
        height=resolution,
        scheduler=eval.scheduler,
        clip_skip=eval.clip_skip,
        conditioning=conditioning,
        consistency=consistency,
        image_prompt=image_prompt,
    )


def _index(jobs: list[SweepJob], out_dir: Path) -> pd.DataFrame:
    rows = [
        {
            "image_id": sha256_file(out_dir / job.relative_path())[:16],
            "image_path": (out_dir / job.relative_path()).as_posix(),
            "candidate": job.candidate,
            "step": job.step,
            "lora_scale": job.lora_scale,
            "prompt_index": job.prompt.index,
            "prompt": job.prompt.text,
            "seed": job.seed,
            "suite": job.prompt.suite,
            "prompt_group": job.prompt.group,
            "identity_shot": job.prompt.identity_shot,
            "pose_image_id": job.pose.image_id if job.pose else None,
            "control_type": job.pose.control_type if job.pose else None,
            "method": job.method,
        }
        for job in jobs
    ]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS).astype(
        {
            "step": "int64",
            "lora_scale": "float64",
            "prompt_index": "int64",
            "seed": "int64",
            "suite": "string",
            "prompt_group": "Int64",
            "identity_shot": "bool",
            "pose_image_id": "string",
            "control_type": "string",
            "method": "string",
        }
    )


def write_contact_sheets(
    index: pd.DataFrame, eval: EvalConfig, out_dir: Path, stand_in: bool, cell: int = 96
) -> list[Path]:
    """One grid per candidate: rows are prompts (first seed, no pose), columns the base model
    then checkpoints at the largest scale (`step`) or scales at the last checkpoint (`scale`)."""
    plain = index[index["pose_image_id"].isna()]
    base = plain[plain["candidate"] == BASE_CANDIDATE]
    written = []
    for candidate in sorted(set(plain["candidate"]) - {BASE_CANDIDATE}):
        rows = plain[plain["candidate"] == candidate]
        if eval.grid_columns == "step":
            top = rows["lora_scale"].max()
            columns = [
                (f"step {s}", rows[(rows.step == s) & (rows.lora_scale == top)])
                for s in sorted(rows["step"].unique())
            ]
        else:
            last = rows["step"].max()
            columns = [
                (f"x{s:g}", rows[(rows.step == last) & (rows.lora_scale == s)])
                for s in sorted(rows["lora_scale"].unique())
            ]
        if not base.empty:
            columns.insert(0, ("base", base))
        written.append(
            _draw_grid(out_dir / GRID_DIR / f"{candidate}.png", candidate, columns, stand_in, cell)
        )
    return written


def _draw_grid(
    path: Path, title: str, columns: list[tuple[str, pd.DataFrame]], stand_in: bool, cell: int
) -> Path:
    prompt_indices = sorted({int(i) for _, frame in columns for i in frame["prompt_index"]})
    label_width, header = 40, 32
    sheet = Image.new(
        "RGB",
        (label_width + cell * len(columns), header + cell * len(prompt_indices)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    caption = f"{title}" + (" (stand-in model: images mean nothing)" if stand_in else "")
    draw.text((4, 2), caption, fill="black")
    for column, (label, frame) in enumerate(columns):
        draw.text((label_width + column * cell + 4, 16), label, fill="black")
        for row, prompt_index in enumerate(prompt_indices):
            matches = frame[frame["prompt_index"] == prompt_index].sort_values("image_path")
            if column == 0:
                draw.text((4, header + row * cell + 4), f"p{prompt_index:02d}", fill="black")
            if matches.empty:
                continue
            with Image.open(matches.iloc[0]["image_path"]) as image:
                thumbnail = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(thumbnail, (label_width + column * cell, header + row * cell))
    write_png(path, sheet)
    return path


def _release(engine: GenerationEngine, name: str | None) -> None:
    if name is not None and name in engine.loras:
        engine.unload_lora(name)


def index_of(jobs: list[SweepJob], out_dir: str | Path) -> pd.DataFrame:
    """The sweep index (INDEX_COLUMNS) of `jobs` rendered under `out_dir`; the server's fresh
    validation of one LoRA writes it too, so the score stage's scorers read it unchanged."""
    return _index(jobs, Path(out_dir))
