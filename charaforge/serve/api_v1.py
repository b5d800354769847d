"""Seed 001's HTTP API under /api/v1: health, txt2img (saved image + metadata paths, elapsed
time), controlnet/pose, lora/list|load|unload and batch/submit|status|cancel.

Images are written under the outputs folder (charaforge.serve.batch.outputs_root), named by
their content, so the same request never writes a second copy.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import Field, model_validator
from starlette.datastructures import UploadFile

from charaforge.core.files import sha256_bytes
from charaforge.generate.records import png_bytes, write_image
from charaforge.generate.request import SCHEDULERS, Conditioning, RenderRequest
from charaforge.serve.batch import BatchRunner, parse_job_file
from charaforge.serve.limits import Body, ServerSettings, decode_image
from charaforge.serve.registry import LoraNotFound
from charaforge.serve.render import http_plan, run
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


class V1Saved(Body):
    image_path: str = Field(description="The PNG written (A1111 `parameters` inside).")
    metadata_path: str = Field(description="Its JSON sidecar with every parameter.")
    elapsed_ms: int = Field(description="Milliseconds from request to written files.")


class V1Lora(Body):
    lora_id: str = Field(min_length=1, max_length=80, description="A LoRA name or alias.")


def router(
    service: Service, settings: ServerSettings, guard: Any, batches: BatchRunner
) -> APIRouter:
    api = APIRouter(prefix="/api/v1", tags=["seed API"])
    guarded = [guard]

    async def render_and_save(body: V1Txt2Img, conditioning: Conditioning | None) -> V1Saved:
        started = time.monotonic()
        template = RenderRequest(
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
        requests, entries = http_plan(service, template, [body.seed], body.loras())
        image = (await run(service, requests, entries))[0]
        data = png_bytes(image)
        day = time.strftime("%Y-%m-%d")
        path = batches.root / day / "single" / f"{sha256_bytes(data)[:16]}.png"
        write_image(path, image)
        return V1Saved(
            image_path=str(path.resolve()),
            metadata_path=str(path.with_suffix(".json").resolve()),
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )

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
        try:
            pose = decode_image(body.pose_image, settings, "pose_image").convert("RGB")
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        conditioning = Conditioning("control", pose, conditioning_scale=body.strength)
        return await render_and_save(body, conditioning)

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
    def batch_status(job_id: str) -> dict[str, Any]:
        """State, done/total, failed rows with their errors, the images written."""
        status = batches.job(job_id[:64])
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

    return api
