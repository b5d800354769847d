"""The FastAPI app: the project's own routes, the A1111-compatible /sdapi/v1, and offline docs.

Requests are validated before they are queued (422 with the reason, never echoing unbounded
input). LoRAs are named, never given as paths (charaforge.serve.registry); `<lora:name:w>` in a
prompt loads and applies that LoRA. Listens on 127.0.0.1 unless told otherwise; an optional
bearer token guards every route but /health, the OpenAPI schema and /docs included.
"""

from __future__ import annotations

import base64
import html
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import Field, field_validator, model_validator

from charaforge.generate.records import png_bytes
from charaforge.generate.request import PRESETS, SCHEDULERS, RenderRequest
from charaforge.serve import a1111, api_v1, ui
from charaforge.serve.batch import BatchRunner, RemoteRows
from charaforge.serve.limits import Body, ServerSettings, bearer_guard, install_error_handlers
from charaforge.serve.registry import NAME_PATTERN, LoraNotFound
from charaforge.serve.render import http_plan, json_parameters, run
from charaforge.serve.worker import Service

# Loopback unless told otherwise: a generation server is not for the whole network by default.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # A1111's port, so its clients find us where they expect


class Txt2ImgRequest(Body):
    """One txt2img call: `batch_size` images, image i seeded with `seed + i` (or `seeds[i]`)."""

    prompt: str = Field(
        min_length=1,
        max_length=2000,
        description="The prompt; `<lora:NAME:WEIGHT>` tags apply LoRAs.",
    )
    negative_prompt: str = Field(default="", max_length=2000, description="The negative prompt.")
    seed: int = Field(default=0, ge=0, lt=2**63, description="Seed of the first image.")
    seeds: list[Annotated[int, Field(ge=0, lt=2**63)]] | None = Field(
        default=None, description="One seed per image (overrides `seed`)."
    )
    batch_size: int = Field(default=1, ge=1, description="Images to render.")
    steps: int | None = Field(default=None, ge=1, description="Sampling steps (default: preset).")
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=30.0, description="Classifier-free guidance (default: preset)."
    )
    preset: str | None = Field(default=None, description=f"One of {list(PRESETS)}.")
    scheduler: str | None = Field(default=None, description=f"One of {sorted(SCHEDULERS)}.")
    width: int | None = Field(default=None, ge=8, description="Width, a multiple of 8.")
    height: int | None = Field(default=None, ge=8, description="Height, a multiple of 8.")
    clip_skip: int = Field(default=1, ge=1, le=12, description="A1111 clip skip (1 = last).")
    loras: dict[str, Annotated[float, Field(ge=-4.0, le=4.0)]] = Field(
        default={}, description="LoRA name (or alias such as `champion`) -> scale."
    )

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


class Txt2ImgResponse(Body):
    images: list[str] = Field(description="base64 PNGs, each with its A1111 `parameters` chunk")
    parameters: list[dict[str, Any]] = Field(description="the full parameters of each image")
    info: list[str] = Field(description="the A1111 `parameters` text of each image")


class LoraLoadRequest(Body):
    name: str = Field(pattern=NAME_PATTERN, description="a LoRA of the registry, by name or alias")


class LoraInfo(Body):
    name: str = Field(description="The name requests use (`<candidate>@<step>` when trained).")
    aliases: list[str] = Field(description="Other names of the same LoRA (`champion`, ...).")
    loaded: bool = Field(description="Whether a worker holds it now.")
    trigger_words: list[str] = Field(description="Added to prompts that use it.")
    default_scale: float = Field(description="The scale a tag without weight gets.")
    description: str = Field(description="Where it comes from.")


def create_app(
    settings: ServerSettings, service: Service | None = None, batch_rows: RemoteRows | None = None
) -> FastAPI:
    """The app; `batch_rows` renders batch jobs' rows elsewhere (Ray actors) instead of the
    device queue."""
    service = service or Service(settings)
    app = FastAPI(
        title="CharaForge",
        description="The CharaForge generation engine: the very code that renders the sweep.",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    install_error_handlers(app, settings)
    guard = bearer_guard(settings)
    guarded = [guard]

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and queue state (open without the token)."""
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

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", dependencies=guarded, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()))

    @app.post("/txt2img", response_model=Txt2ImgResponse, dependencies=guarded)
    async def txt2img(body: Txt2ImgRequest) -> Txt2ImgResponse:
        """Render `batch_size` images; LoRAs from `loras` and from `<lora:...>` prompt tags."""
        template = RenderRequest(
            prompt=body.prompt,
            seed=0,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            negative_prompt=body.negative_prompt,
            width=body.width,
            height=body.height,
            scheduler=body.scheduler,
            preset=body.preset,
            clip_skip=body.clip_skip,
        )
        seeds = body.seeds or [body.seed + offset for offset in range(body.batch_size)]
        requests, entries = http_plan(service, template, seeds, body.loras)
        images = await run(service, requests, entries)
        return Txt2ImgResponse(
            images=[base64.b64encode(png_bytes(image)).decode() for image in images],
            parameters=[json_parameters(image) for image in images],
            info=[image.info["parameters"] for image in images],
        )

    @app.get("/loras", response_model=list[LoraInfo], dependencies=guarded)
    def loras() -> list[LoraInfo]:
        """Every LoRA a request may name: the LoRA folder and the trained candidates."""
        service.registry.reload()
        loaded = set(service.engine.loras)
        return [
            LoraInfo(
                name=entry.name,
                aliases=list(entry.aliases),
                loaded=entry.name in loaded,
                trigger_words=list(entry.trigger_words),
                default_scale=entry.default_scale,
                description=entry.description,
            )
            for entry in service.registry.entries()
        ]

    @app.post("/loras/load", dependencies=guarded)
    def load(body: LoraLoadRequest) -> dict[str, Any]:
        """Load a LoRA on every worker and keep it (prompts load others on demand)."""
        service.registry.reload()
        try:
            entry = service.registry.get(body.name)
        except LoraNotFound as error:
            raise HTTPException(404, str(error).strip("'\"")) from None
        loaded = service.load_pinned(entry)
        return {"name": entry.name, "loaded": True, "short_hash": loaded.short_hash}

    @app.post("/loras/unload", dependencies=guarded)
    def unload(body: LoraLoadRequest) -> dict[str, Any]:
        """Unload a LoRA from every worker."""
        name = service.registry.canonical(body.name)
        if name not in service.engine.loras:
            raise HTTPException(404, f"LoRA {body.name!r} is not loaded")
        service.unload(name)
        return {"name": name, "loaded": False}

    app.include_router(a1111.router(service, settings, guard))
    batches = BatchRunner(service, settings, batch_rows)
    app.state.batches = batches
    app.include_router(api_v1.router(service, settings, guard, batches))
    if settings.ui:
        ui.mount_ui(app, service, batches, settings.token)
    return app


def _type_of(spec: dict[str, Any]) -> str:
    """A field's JSON type as the docs page shows it (`string | null` for optional fields)."""
    if "type" in spec:
        return str(spec["type"])
    options = spec.get("anyOf", [])
    return " | ".join(
        str(option.get("type", option.get("$ref", "?").rsplit("/", 1)[-1])) for option in options
    )


def render_docs(schema: dict[str, Any]) -> str:
    """The API reference as one self-contained page (no CDN: Swagger UI's assets are not on
    disk here, so the page is rendered from the OpenAPI schema itself)."""
    rows = []
    components = schema.get("components", {}).get("schemas", {})
    for path, methods in sorted(schema.get("paths", {}).items()):
        for method, operation in methods.items():
            text = operation.get("description") or operation.get("summary", "")
            rows.append(
                f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                f"<p>{html.escape(text)}</p>"
            )
            parameters = "".join(
                f"<tr><td><code>{html.escape(item['name'])}</code> ({html.escape(item['in'])})"
                f"</td><td>{html.escape(_type_of(item.get('schema', {})))}</td>"
                f"<td>{html.escape(item.get('description', ''))}</td></tr>"
                for item in operation.get("parameters", [])
            )
            if parameters:
                rows.append(
                    f"<table><tr><th>parameter</th><th>type</th><th>meaning</th></tr>{parameters}"
                    "</table>"
                )
            body = operation.get("requestBody", {}).get("content", {})
            for content in body.values():
                ref = content.get("schema", {}).get("$ref", "")
                model = components.get(ref.rsplit("/", 1)[-1], {})
                fields = "".join(
                    f"<tr><td><code>{html.escape(name)}</code></td>"
                    f"<td>{html.escape(_type_of(spec))}</td>"
                    f"<td>{html.escape(spec.get('description', ''))}</td></tr>"
                    for name, spec in model.get("properties", {}).items()
                )
                if fields:
                    rows.append(
                        f"<table><tr><th>field</th><th>type</th><th>meaning</th></tr>{fields}</table>"
                    )
    title = html.escape(schema.get("info", {}).get("title", "API"))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;"
        "padding:2px 6px}table{border-collapse:collapse}</style></head><body>"
        f"<h1>{title} API</h1><p>The machine-readable schema: <a href='openapi.json'>openapi.json"
        f"</a>.</p>{''.join(rows)}</body></html>"
    )
