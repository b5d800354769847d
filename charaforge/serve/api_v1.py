"""Seed 001's HTTP API under /api/v1: health, txt2img (saved image + metadata paths, elapsed
time), controlnet/pose, controlnet (any map type: canny, depth...; or extracted from a photo),
edit (background replacement), suite (shared-attention character groups),
lora/list|load|unload, batch/submit|status|cancel and eval/report (GET: the latest selection
report, its champion, ranking and one LoRA's rows; POST: a fresh fixed prompt + pose validation
of one LoRA scored by the score stage's scorers, serve.validation).

Images are written under the outputs folder (charaforge.serve.batch.outputs_root), named by
their content, so the same request never writes a second copy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from PIL import Image
from pydantic import Field, model_validator
from starlette.datastructures import UploadFile

from charaforge.config import CONTROL_TYPES
from charaforge.core.files import sha256_bytes
from charaforge.generate.records import png_bytes, write_image
from charaforge.generate.request import SCHEDULERS, Conditioning, RenderRequest
from charaforge.serve.batch import MAX_STATUS_WAIT_S, BatchRunner
from charaforge.serve.batch_store import parse_job_file
from charaforge.serve.features import control_conditioning, plan_edit, plan_suite
from charaforge.serve.limits import Body, ServerSettings, decode_image
from charaforge.serve.registry import LoraNotFound, RegisteredLora
from charaforge.serve.render import PlanError, http_plan, run
from charaforge.serve.reports import NoReport, read_report
from charaforge.serve.validation import (
    ValidationUnavailable,
    load_setup,
    plan_validation,
    validation_answer,
    validation_work,
)
from charaforge.serve.worker import Service


class V1Txt2Img(Body):
    prompt: str = Field(min_length=1, max_length=2000, description="Prompt; `<lora:...>` tags.")
    negative: str = Field(default="", max_length=2000, description="Negative prompt.")
    width: int | None = Field(default=None, ge=8, description="Width (multiple of 8).")
    height: int | None = Field(default=None, ge=8, description="Height (multiple of 8).")
    steps: int | None = Field(default=None, ge=1, description="Sampling steps.")
    seed: int = Field(default=0, ge=0, lt=2**63, description="Seed.")
    guidance: float | None = Field(default=None, ge=0, le=30, description="Guidance scale.")
    scheduler: str | None = Field(default=None, description=f"One of {sorted(SCHEDULERS)}.")
    lora_ids: list[str] = Field(default=[], max_length=8, description="LoRA names or aliases.")
    lora_scales: list[float] = Field(default=[], description="One scale per lora_ids entry.")

    @model_validator(mode="after")
    def _consistent(self) -> V1Txt2Img:
        if self.lora_scales and len(self.lora_scales) != len(self.lora_ids):
            raise ValueError("lora_scales needs one scale per lora_ids entry")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler; one of {sorted(SCHEDULERS)}")
        return self

    def loras(self) -> dict[str, float | None]:
        scales: list[float | None] = list(self.lora_scales) or [None] * len(self.lora_ids)
        return dict(zip(self.lora_ids, scales, strict=True))


class V1Pose(V1Txt2Img):
    pose_image: str = Field(min_length=1, description="An OpenPose skeleton image, base64.")
    strength: float = Field(default=1.0, ge=0, le=2, description="ControlNet conditioning scale.")


class V1Control(V1Txt2Img):
    image: str = Field(min_length=1, description="A control map or a photo, base64.")
    control_type: str = Field(default="canny", description=f"One of {list(CONTROL_TYPES)}.")
    extract: bool = Field(
        default=True, description="The image is a photo: extract its map (canny, MediaPipe pose)."
    )
    strength: float = Field(default=1.0, ge=0, le=2, description="ControlNet conditioning scale.")

    @model_validator(mode="after")
    def _known_type(self) -> V1Control:
        if self.control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type: one of {list(CONTROL_TYPES)}")
        return self


class V1Edit(V1Txt2Img):
    image: str = Field(min_length=1, description="The picture whose background to replace, base64.")
    mask: str | None = Field(
        default=None, description="base64 subject mask, white = keep (none: segment a person)."
    )
    strength: float = Field(default=1.0, gt=0, le=1, description="Inpainting strength.")
    shadow: bool = Field(default=False, description="A soft ground shadow under the subject.")


class V1Suite(V1Txt2Img):
    prompt: str = Field(
        min_length=1,
        max_length=20000,
        description="`background#character#action` lines, a blank line between groups.",
    )
    share_background: bool = Field(
        default=False, description="Fixed background: frames share every identity token."
    )
    trigger: str = Field(default="", max_length=80, description="Replaces `{trigger}`.")


class V1Saved(Body):
    image_path: str = Field(description="The PNG written (A1111 `parameters` inside).")
    metadata_path: str = Field(description="Its JSON sidecar with every parameter.")
    elapsed_ms: int = Field(description="Milliseconds from request to written files.")


class V1SuiteSaved(Body):
    groups: list[list[V1Saved]] = Field(description="Per group: the identity shot, then frames.")


class V1Lora(Body):
    lora_id: str = Field(min_length=1, max_length=80, description="A LoRA name or alias.")


class V1EvalRun(Body):
    lora_id: str = Field(
        min_length=1,
        max_length=80,
        description="The LoRA to validate: `<candidate>@<step>`, `<candidate>` (its last "
        "checkpoint), a LoRA of the folder, or an alias such as `champion`.",
    )
    lora_scale: float | None = Field(
        default=None, ge=0, le=4, description="Its scale (default: the LoRA's default scale)."
    )
    pose: bool = Field(
        default=True, description="Also render the sweep's pose conditions (eval.pose)."
    )


def router(
    service: Service, settings: ServerSettings, guard: Any, batches: BatchRunner
) -> APIRouter:
    api = APIRouter(prefix="/api/v1", tags=["seed API"])
    guarded = [guard]

    def template_of(body: V1Txt2Img, conditioning: Conditioning | None) -> RenderRequest:
        return RenderRequest(
            prompt=body.prompt,
            seed=body.seed,
            negative_prompt=body.negative,
            width=body.width,
            height=body.height,
            steps=body.steps,
            guidance_scale=body.guidance,
            scheduler=body.scheduler,
            conditioning=conditioning,
        )

    def save(image: Image.Image, started: float) -> V1Saved:
        data = png_bytes(image)
        day = time.strftime("%Y-%m-%d")
        path = batches.root / day / "single" / f"{sha256_bytes(data)[:16]}.png"
        write_image(path, image)
        return V1Saved(
            image_path=str(path.resolve()),
            metadata_path=str(path.with_suffix(".json").resolve()),
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )

    async def render_and_save(body: V1Txt2Img, conditioning: Conditioning | None) -> V1Saved:
        started = time.monotonic()
        template = template_of(body, conditioning)
        requests, entries = http_plan(service, template, [body.seed], body.loras())
        return save((await run(service, requests, entries))[0], started)

    def image_of(data: str, what: str) -> Image.Image:
        try:
            return decode_image(data, settings, what)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None

    @api.get("/health")
    def health() -> dict[str, Any]:
        """`{"ok": true}` (open without the token)."""
        return {"ok": True, "model": service.engine.model_name}

    @api.post("/txt2img", response_model=V1Saved, dependencies=guarded)
    async def txt2img(body: V1Txt2Img) -> V1Saved:
        """Render one image and save it with its metadata."""
        return await render_and_save(body, None)

    @api.post("/controlnet/pose", response_model=V1Saved, dependencies=guarded)
    async def controlnet_pose(body: V1Pose) -> V1Saved:
        """One image conditioned on an OpenPose skeleton (base64)."""
        pose = image_of(body.pose_image, "pose_image").convert("RGB")
        conditioning = Conditioning("control", pose, conditioning_scale=body.strength)
        return await render_and_save(body, conditioning)

    @api.post("/controlnet", response_model=V1Saved, dependencies=guarded)
    async def controlnet(body: V1Control) -> V1Saved:
        """One image conditioned on a ControlNet map of any type (canny, depth, openpose...):
        the map as sent, or extracted from a photo with the project's preprocessors."""
        image = image_of(body.image, "image").convert("RGB")
        try:
            conditioning = control_conditioning(
                image, body.control_type, body.extract, scale=body.strength
            )
        except (ValueError, OSError) as error:
            raise HTTPException(422, str(error)[:400]) from None
        return await render_and_save(body, conditioning)

    @api.post("/edit", response_model=V1Saved, dependencies=guarded)
    async def edit(body: V1Edit) -> V1Saved:
        """Background replacement (`charaforge edit`): keep the subject, paint a new background
        from the prompt around it."""
        started = time.monotonic()
        image = image_of(body.image, "image").convert("RGB")
        mask = image_of(body.mask, "mask").convert("L") if body.mask is not None else None
        try:
            requests, entries, work = plan_edit(
                service,
                template_of(body, None),
                image,
                mask,
                body.loras(),
                strength=body.strength,
                shadow=body.shadow,
            )
        except PlanError as error:
            raise HTTPException(422, str(error)) from None
        return save((await run(service, requests, entries, label="edit", work=work))[0], started)

    @api.post("/suite", response_model=V1SuiteSaved, dependencies=guarded)
    async def suite(body: V1Suite) -> V1SuiteSaved:
        """A character suite: each group rendered in one call with shared attention (the frames
        attend to the group's identity shot), every image seeded `seed`."""
        started = time.monotonic()
        try:
            groups = plan_suite(
                service,
                body.prompt,
                template_of(body, None),
                body.loras(),
                body.share_background,
                trigger=body.trigger,
            )
        except PlanError as error:
            raise HTTPException(422, str(error)[:400]) from None
        saved = []
        for group in groups:
            images = await run(service, group.requests, group.entries, label="suite")
            saved.append([save(image, started) for image in images])
        return V1SuiteSaved(groups=saved)

    @api.get("/lora/list", dependencies=guarded)
    def lora_list() -> list[dict[str, Any]]:
        """Every LoRA by name, with aliases, triggers, default scale and whether it is loaded."""
        service.registry.reload()
        loaded = set(service.engine.loras)
        return [
            {
                "lora_id": entry.name,
                "aliases": list(entry.aliases),
                "trigger_words": list(entry.trigger_words),
                "default_scale": entry.default_scale,
                "loaded": entry.name in loaded,
            }
            for entry in service.registry.entries()
        ]

    @api.post("/lora/load", dependencies=guarded)
    def lora_load(body: V1Lora) -> dict[str, Any]:
        """Load a LoRA on every worker and keep it loaded."""
        try:
            entry = service.registry.get(body.lora_id)
        except LoraNotFound as error:
            raise HTTPException(404, str(error).strip("'\"")) from None
        loaded = service.load_pinned(entry)
        return {"lora_id": entry.name, "loaded": True, "short_hash": loaded.short_hash}

    @api.post("/lora/unload", dependencies=guarded)
    def lora_unload(body: V1Lora) -> dict[str, Any]:
        """Unload a LoRA from every worker."""
        name = service.registry.canonical(body.lora_id)
        if name not in service.engine.loras:
            raise HTTPException(404, f"LoRA {body.lora_id[:80]!r} is not loaded")
        service.unload(name)
        return {"lora_id": name, "loaded": False}

    @api.post("/batch/submit", dependencies=guarded)
    async def batch_submit(request: Request) -> dict[str, Any]:
        """A job file as a multipart `file` (CSV or JSON), or a JSON body `{"rows": [...]}`."""
        content_type = request.headers.get("content-type", "")
        name = ""
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "batch/submit: send the job file as the field `file`")
            data = await upload.read(settings.max_upload_bytes + 1)
            name = upload.filename or ""
        else:
            data = await request.body()
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"job file over {settings.max_upload_bytes} bytes")
        try:
            rows = parse_job_file(data, name)
        except ValueError as error:
            raise HTTPException(422, str(error)[:400]) from None
        job_id = batches.submit(rows)
        return {"job_id": job_id, "total": len(rows)}

    @api.get("/batch/status/{job_id}", dependencies=guarded)
    async def batch_status(
        job_id: str,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=MAX_STATUS_WAIT_S,
                description="Seconds to wait for the job to end (done, failed or cancelled) "
                "before answering: the answer comes the moment it ends (a long poll). "
                "0 answers at once.",
            ),
        ] = 0,
    ) -> dict[str, Any]:
        """State, done/total, failed rows with their errors, the images written."""
        status = await batches.wait_job(job_id[:64], wait)
        if status is None:
            raise HTTPException(404, "no such batch job")
        status["folder"] = str((batches.root / status.pop("day") / status["job_id"]).resolve())
        return status

    @api.post("/batch/cancel/{job_id}", dependencies=guarded)
    def batch_cancel(job_id: str) -> dict[str, Any]:
        """Stop a queued or running job (finished rows stay)."""
        if batches.job(job_id[:64]) is None:
            raise HTTPException(404, "no such batch job")
        return {"job_id": job_id, "cancelled": batches.cancel(job_id)}

    def report_body(lora_id: str | None) -> dict[str, Any]:
        try:
            report = read_report(settings.reports_dir)
        except NoReport as error:
            raise HTTPException(404, str(error)) from None
        body: dict[str, Any] = {
            "champion": report.champion,
            "metrics": report.metrics,
            "plots": [path.name for path in report.plots],
        }
        if lora_id is None:
            body["ranking"] = report.ranking
            return body
        service.registry.reload()
        name = service.registry.canonical(lora_id)
        candidate, _, step = name.partition("@")
        rows = report.rows_for(candidate, int(step) if step.isdigit() else None)
        if not rows:
            raise HTTPException(404, f"LoRA {lora_id[:80]!r} has no scored rows in the report")
        body.update(lora_id=name, rows=rows)
        return body

    @api.get("/eval/report", dependencies=guarded)
    def eval_report(
        lora_id: Annotated[
            str | None,
            Query(max_length=80, description="One LoRA's scored rows (every scale, its rank)."),
        ] = None,
    ) -> dict[str, Any]:
        """The latest selection report: champion, its metrics, the ranking and the plot names
        (with `lora_id`: that LoRA's rows instead of the ranking)."""
        return report_body(lora_id)

    @api.post("/eval/report", dependencies=guarded)
    async def eval_run(body: V1EvalRun) -> dict[str, Any]:
        """A fresh validation of one LoRA: the sweep's fixed prompts and pose conditions
        rendered for it at one scale on the device queue, scored by the score stage's scorers
        (CLIP-I/T, identity, pose fidelity, tags...). Answers each image's path and scores,
        the mean of each metric, and the scorers' descriptions."""
        started = time.monotonic()
        try:
            params = load_setup(settings)
        except ValidationUnavailable as error:
            raise HTTPException(503, str(error)) from None
        scales, entries = http_plan_loras(body.lora_id, body.lora_scale)
        entry = next(iter(entries.values()))
        scale = scales[entry.name]
        try:
            # Off the event loop: it reads the dataset and the pose stage's skeletons.
            plan = await asyncio.to_thread(
                plan_validation, settings, params, entry, scale, batches.root, body.pose
            )
        except (ValueError, OSError) as error:
            raise HTTPException(422, str(error)[:400]) from None
        result: dict[str, Any] = {}
        work = validation_work(settings, plan, result)
        await run(service, plan.requests, entries, label="eval", work=work)
        answer = validation_answer(plan, result["scores"])
        answer["elapsed_ms"] = round((time.monotonic() - started) * 1000)
        return answer

    def http_plan_loras(
        lora_id: str, scale: float | None
    ) -> tuple[dict[str, float], dict[str, RegisteredLora]]:
        try:
            return service.resolve_loras({lora_id: scale})
        except (LoraNotFound, ValueError) as error:
            raise HTTPException(422, str(error).strip("'\"")) from None

    return api
