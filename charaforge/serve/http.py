"""`charaforge serve`: the generation engine over HTTP (FastAPI).

One worker thread per device owns one GenerationEngine (the base loaded once, LoRAs swapped in
place); requests wait in one bounded queue and are refused with 429 when it is full, so a burst
never piles up unbounded work. Requests are validated before they are queued (422 with the
reason). LoRAs are loaded by name from the LoRA folder only (charaforge.serve.registry): a name is a
plain word, never a path. Listens on 127.0.0.1 unless told otherwise; an optional bearer token
guards every endpoint but /health.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import queue
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from charaforge.core import layout
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import png_bytes
from charaforge.generate.request import PRESETS, SCHEDULERS, RenderRequest
from charaforge.serve.registry import NAME_PATTERN, LoraNotFound, LoraRegistry

log = logging.getLogger(__name__)

# Loopback unless told otherwise: a generation server is not for the whole network by default.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # A1111's port, so its clients find us where they expect


# Module level: FastAPI resolves the (string) annotations of endpoints against module globals.
_BEARER = HTTPBearer(auto_error=False)


@dataclass
class ServerSettings:
    base_dir: Path = Path(layout.BASE_DIR)
    lora_dir: Path = Path(layout.LORAS_DIR)
    devices: list[str] = field(default_factory=lambda: ["auto"])
    memory: str = "device"
    queue_size: int = 8
    token: str | None = None
    max_size: int = 1024
    max_steps: int = 100
    max_batch: int = 4
    scheduler: str = "euler"
    cpu_threads: int | None = None  # torch threads of each worker (None: torch's default)


class Txt2ImgRequest(BaseModel):
    """One txt2img call: `batch_size` images, image i seeded with `seed + i` (or `seeds[i]`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    seed: int = Field(default=0, ge=0, lt=2**63)
    seeds: list[Annotated[int, Field(ge=0, lt=2**63)]] | None = None
    batch_size: int = Field(default=1, ge=1)
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    preset: str | None = None
    scheduler: str | None = None
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    clip_skip: int = Field(default=1, ge=1, le=12)
    loras: dict[str, Annotated[float, Field(ge=-4.0, le=4.0)]] = {}

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None) -> str | None:
        if value is not None and value not in SCHEDULERS:
            raise ValueError(f"unknown scheduler; one of {sorted(SCHEDULERS)}")
        return value

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset; one of {list(PRESETS)}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @model_validator(mode="after")
    def _seeds_match(self) -> Txt2ImgRequest:
        if self.seeds is not None and len(self.seeds) != self.batch_size:
            raise ValueError(
                f"seeds has {len(self.seeds)} entries for batch_size {self.batch_size}"
            )
        return self


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its A1111 `parameters` chunk")
    parameters: list[dict[str, Any]] = Field(description="the full parameters of each image")
    info: list[str] = Field(description="the A1111 `parameters` text of each image")


class LoraLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="a LoRA of the LoRA folder, by name")


class LoraInfo(BaseModel):
    name: str
    loaded: bool
    trigger_words: list[str]
    default_scale: float
    description: str


class Worker:
    """One device: one engine, one thread, jobs from the shared queue."""

    def __init__(
        self, engine: GenerationEngine, jobs: queue.Queue, cpu_threads: int | None = None
    ) -> None:
        self.engine = engine
        self.cpu_threads = cpu_threads
        self.lock = threading.Lock()  # held while rendering and while (un)loading LoRAs
        self.jobs = jobs
        self.running = 0  # jobs taken off the queue and not finished (0 or 1)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.cpu_threads is not None:
            import torch

            torch.set_num_threads(self.cpu_threads)  # OpenMP settings are per thread
        while True:
            job = self.jobs.get()
            if job is None:
                return
            requests, future = job
            if not future.set_running_or_notify_cancel():
                continue
            self.running += 1
            try:
                with self.lock:
                    images = self.engine.render_batch(requests)
                future.set_result(images)
            except Exception as error:  # handed to the request that caused it
                future.set_exception(error)
            finally:
                self.running -= 1


class Service:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.registry = LoraRegistry(settings.lora_dir)
        self.jobs: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self.workers = [
            Worker(
                GenerationEngine(
                    settings.base_dir,
                    scheduler=settings.scheduler,
                    device=device,
                    memory=settings.memory,
                ),
                self.jobs,
                settings.cpu_threads,
            )
            for device in settings.devices
        ]
        for worker in self.workers:
            worker.thread.start()
        self.loras_lock = threading.Lock()

    @property
    def engine(self) -> GenerationEngine:
        return self.workers[0].engine

    def stop(self) -> None:
        for _ in self.workers:
            self.jobs.put(None)


def create_app(settings: ServerSettings, service: Service | None = None) -> FastAPI:
    service = service or Service(settings)
    app = FastAPI(
        title="CharaForge",
        description="The CharaForge generation engine: the very code that renders the sweep.",
        version="0.1.0",
    )
    app.state.service = service

    def authorised(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if settings.token is None:
            return
        if credentials is None or not secrets.compare_digest(
            credentials.credentials.encode(), settings.token.encode()
        ):
            raise HTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    guarded = [Depends(authorised)]

    @app.get("/health")
    def health() -> dict[str, Any]:
        engine = service.engine
        return {
            "status": "ok",
            "model": engine.model_name,
            "stand_in": engine.base.stand_in,
            "devices": [str(worker.engine.device) for worker in service.workers],
            "queued": service.jobs.qsize(),
            "running": sum(worker.running for worker in service.workers),
            "queue_size": settings.queue_size,
        }

    @app.post("/txt2img", response_model=Txt2ImgResponse, dependencies=guarded)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> Txt2ImgResponse:
        requests = _engine_requests(body, settings, service)
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            service.jobs.put_nowait((requests, future))
        except queue.Full:
            raise HTTPException(429, "the queue is full; retry later") from None
        try:
            images = await asyncio.wrap_future(future)
        except (KeyError, ValueError) as error:  # e.g. a LoRA unloaded while queued
            raise HTTPException(422, str(error).strip("'\"")) from None
        return Txt2ImgResponse(
            images=[base64.b64encode(png_bytes(image)).decode() for image in images],
            parameters=[_json_loads(image.info["charaforge"]) for image in images],
            info=[image.info["parameters"] for image in images],
        )

    @app.get("/loras", response_model=list[LoraInfo], dependencies=guarded)
    def loras() -> list[LoraInfo]:
        service.registry.reload()
        loaded = set(service.engine.loras)
        return [
            LoraInfo(
                name=entry.name,
                loaded=entry.name in loaded,
                trigger_words=list(entry.trigger_words),
                default_scale=entry.default_scale,
                description=entry.description,
            )
            for entry in service.registry.entries()
        ]

    @app.post("/loras/load", dependencies=guarded)
    def load(body: LoraLoadRequest) -> dict[str, Any]:
        with service.loras_lock:
            service.registry.reload()
            try:
                entry = service.registry.get(body.name)
            except LoraNotFound as error:
                raise HTTPException(404, str(error).strip("'\"")) from None
            for worker in service.workers:
                with worker.lock:
                    loaded = worker.engine.load_lora(entry.name, entry.file, entry.trigger_words)
        return {"name": entry.name, "loaded": True, "short_hash": loaded.short_hash}

    @app.post("/loras/unload", dependencies=guarded)
    def unload(body: LoraLoadRequest) -> dict[str, Any]:
        with service.loras_lock:
            if body.name not in service.engine.loras:
                raise HTTPException(404, f"LoRA {body.name!r} is not loaded")
            for worker in service.workers:
                with worker.lock:
                    worker.engine.unload_lora(body.name)
        return {"name": body.name, "loaded": False}

    return app


def _engine_requests(
    body: Txt2ImgRequest, settings: ServerSettings, service: Service
) -> list[RenderRequest]:
    """Checks that need the settings or the engine (422 with the reason), then one engine request
    per image."""
    problems = []
    engine = service.engine
    width = body.width or engine.base.resolution
    height = body.height or engine.base.resolution
    if max(width, height) > settings.max_size:
        problems.append(f"width/height: at most {settings.max_size}")
    steps = body.steps if body.steps is not None else PRESETS[body.preset or "standard"].steps
    if steps > settings.max_steps:
        problems.append(f"steps: at most {settings.max_steps}")
    if body.batch_size > settings.max_batch:
        problems.append(f"batch_size: at most {settings.max_batch}")
    if body.clip_skip > engine.text_layers:
        problems.append(f"clip_skip: at most {engine.text_layers} for this model")
    missing = sorted(set(body.loras) - set(engine.loras))
    if missing:
        problems.append(f"loras: not loaded: {missing} (POST /loras/load first)")
    if problems:
        raise HTTPException(422, "; ".join(problems))
    seeds = body.seeds or [body.seed + offset for offset in range(body.batch_size)]
    return [
        RenderRequest(
            prompt=body.prompt,
            seed=seed,
            loras=body.loras,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            negative_prompt=body.negative_prompt,
            width=width,
            height=height,
            scheduler=body.scheduler,
            preset=body.preset,
            clip_skip=body.clip_skip,
        )
        for seed in seeds
    ]


def _json_loads(text: str) -> dict[str, Any]:
    import json

    return json.loads(text)


def serve(settings: ServerSettings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(settings)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        app.state.service.stop()
