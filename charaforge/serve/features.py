"""The generation features beyond txt2img, built once for the HTTP routes and the web UI:
ControlNet maps (an uploaded map, or one extracted from a photo with the project's
preprocessors: MediaPipe pose, canny...), character suites (`background#character#action`
groups rendered with shared attention), and background replacement (generate.edit).

Each returns what `render.run` / `Service.submit` take, so the device queue, the limits and the
`<lora:...>` tags are the same for every route.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image

from charaforge.generate.controls import ControlPreprocessor
from charaforge.generate.edit import EditRequest, replace_background
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.prompts import SuitePrompt, parse_suite
from charaforge.generate.request import Conditioning, Consistency, RenderRequest
from charaforge.serve.registry import RegisteredLora
from charaforge.serve.render import PlanError, plan
from charaforge.serve.worker import Service

MAX_SUITE_GROUPS = 8
MAX_GROUP_IMAGES = 8

_preprocessor: ControlPreprocessor | None = None
_preprocessor_lock = threading.Lock()


def control_map(image: Image.Image, control_type: str, extract: bool) -> Image.Image:
    """`image` as the ControlNet map of `control_type`: as given (already a skeleton, an edge
    map...), or extracted from a photo (MediaPipe pose for openpose, canny edges...)."""
    global _preprocessor
    if not extract:
        return image.convert("RGB")
    with _preprocessor_lock:  # one preprocessor (its models loaded once) for the server
        if _preprocessor is None:
            _preprocessor = ControlPreprocessor()
        return _preprocessor(control_type, image)


def control_conditioning(
    image: Image.Image,
    control_type: str,
    extract: bool,
    scale: float = 1.0,
    guidance_start: float = 0.0,
    guidance_end: float = 1.0,
) -> Conditioning:
    return Conditioning(
        "control",
        control_map(image, control_type, extract),
        control_type=control_type,
        conditioning_scale=scale,
        guidance_start=guidance_start,
        guidance_end=guidance_end,
    )


@dataclass(frozen=True)
class SuiteGroup:
    """One group of a suite: the engine requests (identity shot first) and their LoRAs."""

    prompts: list[SuitePrompt]
    requests: list[RenderRequest]
    entries: dict[str, RegisteredLora]


def plan_suite(
    service: Service,
    text: str,
    template: RenderRequest,
    loras: Mapping[str, float | None],
    share_background: bool,
    trigger: str = "",
) -> list[SuiteGroup]:
    """A `background#character#action` suite (blank lines between groups) as shared-attention
    groups: every image of a group seeded `template.seed`, the frames attending to the group's
    identity shot; `share_background` is CharaConsist's fixed-background mode."""
    try:
        prompts = parse_suite(text, "upload", "suite")
    except ValueError as error:  # ConfigError: a malformed line, with its number
        raise PlanError(str(error)) from None
    groups: dict[int, list[SuitePrompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.group, []).append(prompt)
    if len(groups) > MAX_SUITE_GROUPS or any(len(g) > MAX_GROUP_IMAGES for g in groups.values()):
        raise PlanError(
            f"suite: at most {MAX_SUITE_GROUPS} groups of {MAX_GROUP_IMAGES} lines each"
        )
    planned = []
    for members in groups.values():
        identity = members[0].text(trigger)
        requests: list[RenderRequest] = []
        entries: dict[str, RegisteredLora] = {}
        for member in members:
            consistency = Consistency(
                member.character.replace("{trigger}", trigger),
                identity_prompt=None if member.identity_shot else identity,
                identity_seed=None if member.identity_shot else template.seed,
                share_background=share_background,
            )
            request = dataclasses.replace(
                template, prompt=member.text(trigger), consistency=consistency
            )
            # A group is one engine call: the cost budget counts its images together.
            batch, entries = plan(service, request, [template.seed] * len(members), loras)
            requests.append(batch[0])
        planned.append(SuiteGroup(members, requests, entries))
    return planned


def edit_work(request: EditRequest) -> Callable[[GenerationEngine], list[Image.Image]]:
    """Background replacement as worker work: [the result, the subject mask, the background]."""

    def work(engine: GenerationEngine) -> list[Image.Image]:
        result = replace_background(engine, request)
        return [result.image, result.subject_mask.convert("RGB"), result.background]

    return work


def plan_edit(
    service: Service,
    template: RenderRequest,
    image: Image.Image,
    mask: Image.Image | None,
    loras: Mapping[str, float | None],
    strength: float = 1.0,
    shadow: bool = False,
) -> tuple[list[RenderRequest], dict[str, RegisteredLora], Callable]:
    """Check an edit as a render (LoRAs, tags, cost), then the work that runs it."""
    size = (template.width or image.size[0], template.height or image.size[1])
    sized = dataclasses.replace(template, width=size[0] // 8 * 8, height=size[1] // 8 * 8)
    requests, entries = plan(service, sized, [template.seed], loras)
    planned = requests[0]
    try:
        edit = EditRequest(
            image=image,
            prompt=planned.prompt,
            seed=planned.seed,
            mask=mask,
            negative_prompt=planned.negative_prompt,
            loras=planned.loras,
            steps=planned.steps,
            guidance_scale=planned.guidance_scale,
            size=(planned.width, planned.height),
            strength=strength,
            shadow=shadow,
        )
    except ValueError as error:
        raise PlanError(str(error)) from None
    return requests, entries, edit_work(edit)
