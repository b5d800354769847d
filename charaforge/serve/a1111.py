"""An AUTOMATIC1111-compatible subset under /sdapi/v1, for the scripts people already have.

Request fields and response shapes follow A1111's API (`images` as base64 PNGs, `parameters`,
`info` as a JSON string); A1111 sampler names map to the engine's schedulers. A1111 clients post
many fields this engine has no use for (`restore_faces`, `enable_hr`, ...): they are accepted
and listed in `info` as `ignored_fields`, never silently given a meaning. LoRAs come from
`<lora:NAME:WEIGHT>` prompt tags, as in A1111.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import ConfigDict, Field

from charaforge.config import CONTROL_TYPES
from charaforge.generate.records import png_bytes
from charaforge.generate.request import SCHEDULERS, Conditioning, ControlUnit, RenderRequest
from charaforge.serve.features import control_map
from charaforge.serve.limits import Body, ServerSettings, decode_image
from charaforge.serve.render import http_plan, json_parameters, run
from charaforge.serve.worker import Service

# A1111 name (lower case) -> scheduler; our own config names are accepted too.
SAMPLERS: dict[str, str] = {
    **{label.lower(): name for name, (_, _, label) in SCHEDULERS.items()},
    **{name: name for name in SCHEDULERS},
    "euler_ancestral": "euler_a",
}
# A1111 >= 1.9 sends the noise schedule apart from the sampler.
_KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}


def sampler_for(name: str | None, schedule: str | None) -> str | None:
    """The scheduler for an A1111 sampler (and schedule) name; ValueError for one we lack."""
    if name is None:
        return None
    scheduler = SAMPLERS.get(name.strip().lower())
    if scheduler is None:
        offered = sorted({label for _, _, label in SCHEDULERS.values()})
        raise ValueError(f"sampler_name {name[:60]!r} is not offered; one of {offered}")
    if schedule and schedule.strip().lower() == "karras":
        scheduler = _KARRAS.get(scheduler, scheduler)
    return scheduler


class A1111Txt2Img(Body):
    """A1111's txt2img fields this engine uses; other A1111 fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field(default="", max_length=4000, description="Prompt; `<lora:NAME:W>` tags.")
    negative_prompt: str = Field(default="", max_length=4000, description="Negative prompt.")
    seed: int = Field(default=-1, ge=-1, lt=2**63, description="-1 picks a random seed.")
    steps: int = Field(default=20, ge=1, description="Sampling steps.")
    cfg_scale: float = Field(default=7.0, ge=0.0, le=30.0, description="Guidance scale.")
    width: int | None = Field(default=None, ge=8, description="Width (multiple of 8).")
    height: int | None = Field(default=None, ge=8, description="Height (multiple of 8).")
    sampler_name: str | None = Field(default=None, description="An A1111 sampler name.")
    sampler_index: str | None = Field(default=None, description="Old name of sampler_name.")
    scheduler: str | None = Field(default=None, description="A1111 schedule: `Karras` or none.")
    batch_size: int = Field(default=1, ge=1, description="Images per iteration.")
    n_iter: int = Field(default=1, ge=1, description="Iterations (images = batch x n_iter).")
    override_settings: dict[str, Any] = Field(
        default={}, description="`CLIP_stop_at_last_layers` (clip skip), `sd_model_checkpoint`."
    )
    override_settings_restore_afterwards: bool = Field(default=True, description="Always true.")
    alwayson_scripts: dict[str, Any] = Field(
        default={},
        description='`controlnet`: `{"args": [unit, ...]}` as the sd-webui-controlnet extension'
        " takes them (`image`/`input_image` base64, `module` (`none`: the image is the map),"
        " `model`, `weight`, `guidance_start`, `guidance_end`, `enabled`); other scripts are"
        " listed in `info.ignored_fields`.",
    )


class A1111Img2Img(A1111Txt2Img):
    init_images: list[str] = Field(min_length=1, description="base64 start images (the first).")
    mask: str | None = Field(default=None, description="base64 inpainting mask, white = repaint.")
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1, description="1: black = repaint.")
    denoising_strength: float = Field(default=0.75, gt=0.0, le=1.0, description="Strength.")
    include_init_images: bool = Field(default=False, description="Echo the init images back.")


class A1111Response(Body):
    images: list[str] = Field(description="base64 PNGs with the A1111 `parameters` chunk.")
    parameters: dict[str, Any] = Field(description="The request as understood.")
    info: str = Field(description="A JSON string: prompts, seeds, sampler, size, infotexts.")


def _template(body: A1111Txt2Img, size: tuple[int, int] | None) -> tuple[RenderRequest, int]:
    problems = []
    try:
        scheduler = sampler_for(body.sampler_name or body.sampler_index, body.scheduler)
    except ValueError as error:
        problems.append(str(error))
        scheduler = None
    clip_skip = body.override_settings.get("CLIP_stop_at_last_layers", 1)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= 12:
        problems.append("override_settings.CLIP_stop_at_last_layers: an integer 1..12")
        clip_skip = 1
    unknown = sorted(
        set(body.override_settings) - {"CLIP_stop_at_last_layers", "sd_model_checkpoint"}
    )
    if unknown:
        problems.append(f"override_settings: not supported: {[k[:40] for k in unknown[:10]]}")
    width = body.width or (size[0] // 8 * 8 if size else None)
    height = body.height or (size[1] // 8 * 8 if size else None)
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value % 8 or value < 8):
            problems.append(f"{name}: a multiple of 8 (at least 8)")
    if not body.prompt.strip():
        problems.append("prompt: empty")
    if problems:
        raise HTTPException(422, "; ".join(problems))
    seed = body.seed if body.seed >= 0 else secrets.randbelow(2**32)
    template = RenderRequest(
        prompt=body.prompt,
        seed=seed,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        scheduler=scheduler,
        clip_skip=clip_skip,
    )
    return template, seed


def _control_type(unit: dict[str, Any]) -> str:
    """The ControlNet type a unit names: by its model (`control_v11p_sd15_canny`), else by its
    preprocessor module (`canny`, `openpose_full`, `depth_midas`...)."""
    for text in (str(unit.get("model") or ""), str(unit.get("module") or "")):
        for control_type in sorted(CONTROL_TYPES, key=len, reverse=True):
            if control_type in text.lower():
                return control_type
    raise ValueError(
        f"controlnet unit: model {str(unit.get('model'))[:60]!r} names no type of "
        f"{list(CONTROL_TYPES)}"
    )


def controlnet_units_ignored(scripts: dict[str, Any]) -> list[str]:
    return [f"alwayson_scripts.{name}"[:60] for name in scripts if name.lower() != "controlnet"]


def controlnet_units(
    scripts: dict[str, Any], settings: ServerSettings
) -> tuple[Conditioning | None, list[str]]:
    """The extension's ControlNet units as one Conditioning (several: MultiControlNet), and the
    names of the scripts not used. ValueError (422) for a unit that cannot be read."""
    ignored = controlnet_units_ignored(scripts)
    script = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if script is None:
        return None, ignored
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise ValueError('alwayson_scripts.controlnet: needs {"args": [unit, ...]}')
    units: list[ControlUnit] = []
    for number, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise ValueError(f"alwayson_scripts.controlnet.args[{number}]: an object")
        if unit.get("enabled", True) is False:
            continue
        data = unit.get("image") or unit.get("input_image")
        if isinstance(data, dict):  # newer extension versions: {"image": ..., "mask": ...}
            data = data.get("image")
        if not isinstance(data, str):
            raise ValueError(f"alwayson_scripts.controlnet.args[{number}]: no image")
        control_type = _control_type(unit)
        image = decode_image(data, settings, f"controlnet.args[{number}].image").convert("RGB")
        module = str(unit.get("module") or "none").lower()
        units.append(
            ControlUnit(
                control_type,
                control_map(image, control_type, extract=module != "none"),
                float(unit.get("weight", 1.0)),
                float(unit.get("guidance_start", 0.0)),
                float(unit.get("guidance_end", 1.0)),
            )
        )
    if not units:
        return None, ignored
    first, *more = units
    conditioning = Conditioning(
        "control",
        first.image,
        control_type=first.control_type,
        conditioning_scale=first.conditioning_scale,
        guidance_start=first.guidance_start,
        guidance_end=first.guidance_end,
        controls=tuple(more),
    )
    return conditioning, ignored


def _info(body: A1111Txt2Img, images: list, engine: Any, strength: float | None) -> str:
    params = [json_parameters(image) for image in images]
    first = params[0]
    return json.dumps(
        {
            "prompt": first["prompt"],
            "all_prompts": [item["prompt"] for item in params],
            "negative_prompt": first["negative_prompt"],
            "all_negative_prompts": [item["negative_prompt"] for item in params],
            "seed": first["seed"],
            "all_seeds": [item["seed"] for item in params],
            "subseed": -1,
            "all_subseeds": [-1] * len(params),
            "subseed_strength": 0,
            "width": first["width"],
            "height": first["height"],
            "sampler_name": first["sampler"],
            "cfg_scale": first["guidance_scale"],
            "steps": first["steps"],
            "batch_size": body.batch_size,
            "n_iter": body.n_iter,
            "clip_skip": first.get("clip_skip", 1),
            "denoising_strength": strength,
            "sd_model_name": engine.model_name,
            "stand_in": first["stand_in"],
            "loras": first["loras"],
            "infotexts": [image.info["parameters"] for image in images],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "ignored_fields": sorted(
                [*(body.model_extra or {}), *controlnet_units_ignored(body.alwayson_scripts)]
            ),
        }
    )


def router(service: Service, settings: ServerSettings, guard: Any) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["A1111-compatible"], dependencies=[guard])

    async def render(body: A1111Txt2Img, conditioning: Conditioning | None) -> A1111Response:
        try:
            control, _ = controlnet_units(body.alwayson_scripts, settings)
        except ValueError as error:
            raise HTTPException(422, str(error)[:400]) from None
        if control is not None and conditioning is not None:
            raise HTTPException(422, "alwayson_scripts.controlnet: not with img2img here")
        size = conditioning.image.size if conditioning is not None else None
        conditioning = conditioning or control
        template, seed = _template(body, size)
        template = RenderRequest(**{**template.__dict__, "conditioning": conditioning})
        count = body.batch_size * body.n_iter
        requests, entries = http_plan(service, template, [seed + i for i in range(count)])
        label = "img2img" if size is not None else "txt2img"
        images = await run(service, requests, entries, label=label)
        echoed = body.model_dump(exclude={"init_images", "mask"})
        strength = conditioning.strength if size is not None else None
        encoded = [base64.b64encode(png_bytes(image)).decode() for image in images]
        if isinstance(body, A1111Img2Img) and body.include_init_images:
            encoded += body.init_images[:1]
        return A1111Response(
            images=encoded,
            parameters=echoed,
            info=_info(body, images, service.engine, strength),
        )

    @api.post("/txt2img", response_model=A1111Response)
    async def txt2img(body: A1111Txt2Img) -> A1111Response:
        """A1111's txt2img."""
        return await render(body, None)

    @api.post("/img2img", response_model=A1111Response)
    async def img2img(body: A1111Img2Img) -> A1111Response:
        """A1111's img2img; with `mask`, inpainting (only the white region changes)."""
        try:
            image = decode_image(body.init_images[0], settings, "init_images[0]").convert("RGB")
            mask = None
            if body.mask is not None:
                mask = decode_image(body.mask, settings, "mask").convert("L")
                if body.inpainting_mask_invert:
                    mask = mask.point(lambda value: 255 - value)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        conditioning = Conditioning(
            "inpaint" if mask is not None else "img2img",
            image,
            mask=mask,
            strength=body.denoising_strength,
        )
        return await render(body, conditioning)

    @api.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        """The samplers offered, by A1111 name (aliases: the engine's config names)."""
        return [
            {"name": label, "aliases": [name], "options": {}}
            for name, (_, _, label) in SCHEDULERS.items()
        ]

    @api.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        """The one base model this server holds."""
        engine = service.engine
        return [
            {
                "title": engine.model_name,
                "model_name": engine.model_name,
                "hash": None,
                "sha256": None,
                "filename": engine.model_name,
                "config": None,
            }
        ]

    @api.get("/loras")
    def loras() -> list[dict[str, Any]]:
        """Every LoRA a `<lora:NAME:W>` tag may name (aliases listed in metadata)."""
        service.registry.reload()
        return [
            {
                "name": entry.name,
                "alias": entry.aliases[0] if entry.aliases else entry.name,
                "path": entry.file.name,
                "metadata": {
                    "trigger_words": list(entry.trigger_words),
                    "default_scale": entry.default_scale,
                    "aliases": list(entry.aliases),
                },
            }
            for entry in service.registry.entries()
        ]

    @api.get("/progress")
    def progress() -> dict[str, Any]:
        """The running job's sampling progress, shaped as A1111's."""
        job = service.current_job()
        steps = job.steps if job is not None else 0
        step = job.step if job is not None else 0
        return {
            "progress": step / steps if steps else 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": False,
                "interrupted": bool(job and job.cancel_event.is_set()),
                "job": job.label if job is not None else "",
                "job_count": service.jobs.qsize() + (1 if job is not None else 0),
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": step,
                "sampling_steps": steps,
            },
            "current_image": None,
            "textinfo": None,
        }

    @api.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        """Stop the running job at its next sampling step."""
        job = service.current_job()
        if job is not None:
            job.cancel("interrupted")
        return {"interrupted": job is not None}

    return api
