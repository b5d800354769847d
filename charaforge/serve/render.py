"""From a route's request to engine requests: prompt LoRA tags, LoRA names, limits, the queue.

Every route (own API, /api/v1, /sdapi/v1, batch rows, the web UI) goes through `plan` and `run`,
so `<lora:name:weight>`, the cost budget and the 422/429/504 answers are the same everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import HTTPException
from PIL import Image

from charaforge.generate.engine import GenerationEngine
from charaforge.generate.loras import compose_loras, parse_prompt_loras
from charaforge.generate.request import PRESETS, RenderRequest
from charaforge.serve.limits import check_cost
from charaforge.serve.registry import LoraNotFound, RegisteredLora
from charaforge.serve.worker import QueueFull, RenderCancelled, Service


class PlanError(ValueError):
    """A request that cannot be rendered as asked (422 over HTTP, one line on the CLI)."""


def plan(
    service: Service,
    template: RenderRequest,
    seeds: Sequence[int],
    loras: Mapping[str, float | None] | None = None,
) -> tuple[list[RenderRequest], dict[str, RegisteredLora]]:
    """One engine request per seed from `template`, with the LoRAs of the `loras` field and of
    the prompt's `<lora:...>` tags resolved by name; PlanError with every reason otherwise."""
    problems: list[str] = []
    prompt, tagged = template.prompt, {}
    try:
        prompt, tagged = parse_prompt_loras(template.prompt)
        negative, negative_tags = parse_prompt_loras(template.negative_prompt)
        if negative_tags:
            raise ValueError("the negative prompt cannot name LoRAs")
        composed = compose_loras(dict(loras or {}), tagged)
    except ValueError as error:
        raise PlanError(str(error)) from None
    if not prompt.strip():
        problems.append("prompt: empty once its <lora:...> tags are removed")
    scales: dict[str, float] = {}
    entries: dict[str, RegisteredLora] = {}
    try:
        scales, entries = service.resolve_loras(composed)
    except (LoraNotFound, ValueError) as error:
        problems.append(str(error).strip("'\""))
    engine = service.engine
    width = template.width or engine.base.resolution
    height = template.height or engine.base.resolution
    steps = template.steps or PRESETS[template.preset or "standard"].steps
    problems += check_cost(service.settings, width, height, steps, len(seeds))
    if template.clip_skip > engine.text_layers:
        problems.append(f"clip_skip: at most {engine.text_layers} for this model")
    if problems:
        raise PlanError("; ".join(problems))
    requests = [
        dataclasses.replace(
            template,
            prompt=prompt,
            negative_prompt=negative,
            seed=int(seed),
            loras=scales,
            width=width,
            height=height,
        )
        for seed in seeds
    ]
    return requests, entries


def http_plan(
    service: Service,
    template: RenderRequest,
    seeds: Sequence[int],
    loras: Mapping[str, float | None] | None = None,
) -> tuple[list[RenderRequest], dict[str, RegisteredLora]]:
    try:
        return plan(service, template, seeds, loras)
    except PlanError as error:
        raise HTTPException(422, str(error)) from None


async def run(
    service: Service,
    requests: list[RenderRequest],
    entries: dict[str, RegisteredLora],
    label: str = "txt2img",
    work: Callable[[GenerationEngine], list[Image.Image]] | None = None,
) -> list[Image.Image]:
    """Queue and await one job: 429 when the queue is full, 504 past the time limit, 422 for
    what only the engine can tell (a conditioning it refuses)."""
    try:
        job = service.submit(requests, entries, label=label, work=work)
    except QueueFull as error:
        raise HTTPException(429, str(error)) from None
    try:
        return await service.render(job)
    except RenderCancelled as error:
        raise HTTPException(504, str(error)) from None
    except (KeyError, ValueError) as error:
        raise HTTPException(422, str(error).strip("'\"")[:400]) from None


def json_parameters(image: Image.Image) -> dict[str, Any]:
    import json

    return json.loads(image.info["charaforge"])
