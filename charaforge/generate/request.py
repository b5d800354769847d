"""What one image is rendered from: a typed request, its conditioning, schedulers and presets.

`RenderRequest` is the one way the sweep, the CLI and the HTTP server ask the engine for an
image; a misspelt field is a TypeError at construction, not a silently ignored key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from PIL import Image

from charaforge.config import CONTROL_TYPES, SharingBlocks
from charaforge.core.files import sha256_bytes

# Config name -> (diffusers class, extra config, A1111 sampler name).
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}


SchedulerName = Literal["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]


@dataclass(frozen=True)
class Consistency:
    """A request's part in a consistent group.

    `character` is the character text of the prompt (the middle field of a suite line); its
    tokens' cross-attention locates the character. `identity_prompt` and `identity_seed` name the
    group's identity shot for a frame (None for the identity shot itself): a frame's pixels depend
    on them, so they are part of its recorded parameters.
    """

    character: str
    identity_prompt: str | None = None
    identity_seed: int | None = None
    share_background: bool = False
    mask_threshold: float = 0.5
    # StoryDiffusion's group tokens: besides the identity shot's, a frame attends to this share
    # of each earlier frame's (character) tokens, sampled afresh per layer and step. 0: none.
    group_tokens: float = 0.0
    # The weight of the shared tokens in the frame's attention (a log(strength) logit bias).
    strength: float = 1.0
    # Where sharing applies: every transformer block, or the down / mid / up blocks (one or two).
    blocks: SharingBlocks = "all"
    # The share of the sampling steps (start, end) during which the frames share.
    window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not self.character.strip():
            raise ValueError("consistency.character must name the character text of the prompt")
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError(f"consistency.mask_threshold must be in [0, 1]: {self.mask_threshold}")
        if not 0.0 <= self.group_tokens <= 1.0:
            raise ValueError(f"consistency.group_tokens must be in [0, 1]: {self.group_tokens}")
        if not 0.0 < self.strength <= 10.0:
            raise ValueError(f"consistency.strength must be in (0, 10]: {self.strength}")
        if self.blocks not in get_args(SharingBlocks):
            choices = ", ".join(get_args(SharingBlocks))
            raise ValueError(f"consistency.blocks must be one of {choices}: {self.blocks!r}")
        start, end = (float(value) for value in self.window)
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"consistency.window must be 0 <= start < end <= 1: {self.window}")
        if (self.identity_prompt is None) != (self.identity_seed is None):
            raise ValueError("a frame names both identity_prompt and identity_seed (or neither)")

    @property
    def is_identity(self) -> bool:
        return self.identity_prompt is None

    def settings(self) -> tuple:
        """What every image of one group must agree on."""
        return (
            self.share_background,
            float(self.mask_threshold),
            float(self.group_tokens),
            float(self.strength),
            self.blocks,
            tuple(float(value) for value in self.window),
        )

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "character": self.character,
            "share_background": self.share_background,
            "mask_threshold": float(self.mask_threshold),
        }
        # The later options only when set, so the sidecars of earlier renders stay valid.
        defaults = {"group_tokens": 0.0, "strength": 1.0, "blocks": "all", "window": (0.0, 1.0)}
        for name, default in defaults.items():
            value = getattr(self, name)
            if name == "window":
                value = tuple(float(part) for part in value)
            if value != default:
                record[name] = list(value) if name == "window" else value
        if not self.is_identity:
            record["identity"] = {"prompt": self.identity_prompt, "seed": int(self.identity_seed)}
        return record


@dataclass(frozen=True)
class Preset:
    steps: int
    guidance_scale: float


# Quality presets: steps and guidance, the two knobs that trade time for quality.
PRESETS: dict[str, Preset] = {
    "draft": Preset(steps=8, guidance_scale=5.0),
    "standard": Preset(steps=20, guidance_scale=7.0),
    "high": Preset(steps=30, guidance_scale=7.0),
    "ultra": Preset(steps=50, guidance_scale=7.5),
}


PresetName = Literal["draft", "standard", "high", "ultra"]


def image_digest(image: Image.Image) -> str:
    """A stable id of an image's pixels (mode, size, bytes), recorded in the parameters."""
    header = f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode()
    return sha256_bytes(header + image.tobytes())[:16]


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet: its map, its weight and the part of the denoising it acts in.

    `guidance_start` / `guidance_end` are fractions of the steps (diffusers'
    control_guidance_start/end, A1111's Guidance Start/End).
    """

    control_type: str
    image: Image.Image
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def __post_init__(self) -> None:
        if self.control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type {self.control_type!r}: one of {CONTROL_TYPES}")
        if not 0.0 <= self.guidance_start < self.guidance_end <= 1.0:
            raise ValueError(
                "control guidance window: need 0 <= start < end <= 1, got "
                f"{self.guidance_start}..{self.guidance_end}"
            )
        if self.conditioning_scale < 0:
            raise ValueError(f"conditioning_scale must be >= 0, got {self.conditioning_scale}")

    def record(self) -> dict[str, Any]:
        return {
            "control_type": self.control_type,
            "image": image_digest(self.image),
            "conditioning_scale": float(self.conditioning_scale),
            "guidance_start": float(self.guidance_start),
            "guidance_end": float(self.guidance_end),
        }


@dataclass(frozen=True)
class Conditioning:
    """What conditions an image besides the prompt.

    kind `control`: a ControlNet of `control_type` reads `image` (an OpenPose skeleton, a canny
    edge map or a depth map, already in that form: see generate.conditioning for making them).
    kind `img2img`: `image` is the starting picture, noised to `strength`.
    kind `inpaint`: as img2img, only where `mask` is white.
    `source` names where the image came from (a dataset image_id...), for the record.
    `guidance_start`/`guidance_end` bound the steps the (first) ControlNet acts in; `controls`
    adds more ControlNets (diffusers' MultiControlNetModel), each with its own scale and window.
    """

    kind: Literal["control", "img2img", "inpaint"]
    image: Image.Image
    mask: Image.Image | None = None
    control_type: str = "openpose"
    conditioning_scale: float = 1.0
    strength: float = 0.75
    source: str = ""
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    controls: tuple[ControlUnit, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "inpaint" and self.mask is None:
            raise ValueError("inpainting needs a mask (white = repaint)")
        if self.kind == "control":
            self.control_units()  # validates type, scale and window of each
        elif self.controls:
            raise ValueError("controls: only kind 'control' takes ControlNets")
        if self.kind != "control" and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")

    def control_units(self) -> tuple[ControlUnit, ...]:
        """The ControlNets in order: the first from this object's own fields, then `controls`."""
        first = ControlUnit(
            self.control_type,
            self.image,
            self.conditioning_scale,
            self.guidance_start,
            self.guidance_end,
        )
        return (first, *self.controls)

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, "image": image_digest(self.image)}
        if self.source:
            record["source"] = self.source
        if self.kind == "control":
            record.update(
                control_type=self.control_type, conditioning_scale=float(self.conditioning_scale)
            )
            # Written only when used, so sidecars of earlier single-ControlNet sweeps still match.
            if (self.guidance_start, self.guidance_end) != (0.0, 1.0) or self.controls:
                record.update(
                    guidance_start=float(self.guidance_start),
                    guidance_end=float(self.guidance_end),
                )
            if self.controls:
                record["controls"] = [unit.record() for unit in self.controls]
        else:
            record["strength"] = float(self.strength)
        if self.mask is not None:
            record["mask"] = image_digest(self.mask)
        return record


@dataclass(frozen=True)
class ImagePrompt:
    """An IP-Adapter reference image (a style or face reference) and its scale.

    Scale 0 leaves the image prompt without effect (the render equals the plain one).
    """

    image: Image.Image
    scale: float = 0.6
    source: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale <= 2.0:
            raise ValueError(f"ip_adapter scale must be in [0, 2], got {self.scale}")

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"image": image_digest(self.image), "scale": float(self.scale)}
        if self.source:
            record["source"] = self.source
        return record


@dataclass(frozen=True, kw_only=True)
class RenderRequest:
    """Everything that decides one image (unset fields take the engine's or the preset's value).

    `loras` maps loaded LoRA names to scales; only those are active for this image. `preset`
    fills `steps` and `guidance_scale` that are not given; `clip_skip` counts as A1111 does.
    """

    prompt: str
    seed: int
    loras: Mapping[str, float] = field(default_factory=dict)
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    preset: str | None = None
    clip_skip: int = 1
    conditioning: Conditioning | None = None
    # Part of a consistent-character group (generate.consistent): the first request of a batch
    # is the identity shot, the others attend to its character tokens.
    consistency: Consistency | None = None
    # An IP-Adapter image prompt (the engine loads its adapter on first use).
    image_prompt: ImagePrompt | None = None

    @classmethod
    def from_options(cls, prompt: str, seed: int, **options: Any) -> RenderRequest:
        """A request from keyword options (a misspelt option is a TypeError naming it)."""
        return cls(prompt=prompt, seed=seed, **options)

    def settings(
        self, scheduler: str, resolution: int, text_layers: int
    ) -> tuple[int, float, str, int, int]:
        """(steps, guidance scale, scheduler, width, height) with the preset's and the engine's
        defaults (`scheduler`, `resolution`) filled in; a ValueError names a bad one."""
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; one of {list(PRESETS)}")
        chosen = PRESETS[self.preset or "standard"]
        steps = chosen.steps if self.steps is None else int(self.steps)
        guidance = chosen.guidance_scale if self.guidance_scale is None else self.guidance_scale
        scheduler = self.scheduler or scheduler
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; one of {sorted(SCHEDULERS)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 1 <= self.clip_skip <= text_layers:
            raise ValueError(f"clip_skip must be in 1..{text_layers}, got {self.clip_skip}")
        width, height = int(self.width or resolution), int(self.height or resolution)
        if width % 8 or height % 8 or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of 8: {width}x{height}")
        return steps, float(guidance), scheduler, width, height
