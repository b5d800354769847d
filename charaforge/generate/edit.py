"""Background replacement and relighting: keep a subject, paint a new background around it.

The fixes ProdGen lists for what goes wrong are each a step here:
- uncontrolled segmentation -> an explicit subject mask (given, or MediaPipe's person
  segmentation, saved so a user can check it);
- floating objects -> an optional ground shadow under the subject (a soft ellipse at the foot of
  its bounding box, darkening only the new background);
- lost colours -> the original subject blended back over the result with a feathered margin:
  pixels `blend_margin` or more inside the subject are the original's exactly, the margin ramps
  linearly so the edge mixes into the new background without a seam.

The background is the engine's own inpainting (white = repaint = not the subject), so LoRAs,
schedulers and seeds work as in every render; relighting (IC-Light, generate.relight) runs on the
composite before the subject is blended back, at `subject_blend` < 1 letting its light through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from charaforge.core.files import write_png
from charaforge.errors import ConfigError
from charaforge.generate.controls import person_mask
from charaforge.generate.engine import GenerationEngine
from charaforge.generate.records import SIDECAR_KEY, write_image
from charaforge.generate.relight import IcLightVariant, Relighter
from charaforge.generate.request import Conditioning, RenderRequest

SHADOW_HEIGHT = 0.15  # of the subject's width
SHADOW_BLUR = 0.04  # Gaussian radius, of the image's width


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """One background replacement. `mask`: white = the subject (None: segment a person)."""

    image: Image.Image
    prompt: str
    seed: int
    mask: Image.Image | None = None
    negative_prompt: str = ""
    loras: Mapping[str, float] = field(default_factory=dict)
    steps: int | None = None
    guidance_scale: float | None = None
    size: tuple[int, int] | None = None
    strength: float = 1.0
    shadow: bool = False
    shadow_opacity: float = 0.5
    blend_margin: int = 4
    subject_blend: float = 1.0
    relight: bool = False
    relight_strength: float = 0.5

    def __post_init__(self) -> None:
        if self.blend_margin < 0:
            raise ValueError(f"blend_margin must be >= 0 pixels, got {self.blend_margin}")
        if not 0.0 <= self.subject_blend <= 1.0:
            raise ValueError(f"subject_blend must be in [0, 1], got {self.subject_blend}")
        if not 0.0 <= self.shadow_opacity <= 1.0:
            raise ValueError(f"shadow_opacity must be in [0, 1], got {self.shadow_opacity}")


@dataclass
class EditResult:
    image: Image.Image
    original: Image.Image
    subject_mask: Image.Image
    background: Image.Image
    alpha: np.ndarray
    relit: Image.Image | None = None

    def panels(self) -> list[tuple[str, Image.Image]]:
        panels = [("before", self.original), ("subject mask", self.subject_mask.convert("RGB"))]
        panels.append(("new background", self.background))
        if self.relit is not None:
            panels.append(("relit", self.relit))
        return [*panels, ("after", self.image)]


def blend_alpha(subject_mask: Image.Image, margin: int) -> np.ndarray:
    """Per-pixel weight of the original subject: 1 at `margin` px or more inside the mask,
    falling linearly to 0 at its edge; 0 outside (float32, height x width)."""
    import cv2

    inside = (np.asarray(subject_mask.convert("L")) >= 128).astype(np.uint8)
    if margin == 0:
        return inside.astype(np.float32)
    distance = cv2.distanceTransform(inside, cv2.DIST_L2, 5)
    return np.clip(distance / float(margin), 0.0, 1.0).astype(np.float32)


def ground_shadow(subject_mask: Image.Image, opacity: float) -> np.ndarray:
    """How much the background darkens under the subject (0..opacity, height x width): a soft
    ellipse centred on the bottom of the subject's bounding box, as wide as the subject."""
    inside = np.asarray(subject_mask.convert("L")) >= 128
    width, height = subject_mask.size
    shade = Image.new("L", (width, height), 0)
    if inside.any():
        rows, columns = np.nonzero(inside)
        left, right, bottom = columns.min(), columns.max(), rows.max()
        half_height = max(1.0, SHADOW_HEIGHT * (right - left + 1) / 2)
        box = (left, bottom - half_height, right, bottom + half_height)
        ImageDraw.Draw(shade).ellipse(box, fill=255)
        shade = shade.filter(ImageFilter.GaussianBlur(max(1.0, SHADOW_BLUR * width)))
    return np.asarray(shade, np.float32) / 255.0 * opacity


def _size(request: EditRequest, engine: GenerationEngine) -> tuple[int, int]:
    if request.size is not None:
        width, height = request.size
    else:
        width, height = request.image.size
    # The pipeline works on multiples of 8 (the VAE's down-sampling).
    width, height = max(8, width // 8 * 8), max(8, height // 8 * 8)
    return width, height


def replace_background(
    engine: GenerationEngine,
    request: EditRequest,
    relighter: Relighter | None = None,
) -> EditResult:
    """Paint a new background from `request.prompt` around the subject; see the module notes."""
    size = _size(request, engine)
    original = request.image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    source = request.mask if request.mask is not None else person_mask(original)
    mask = source.convert("L").resize(size, Image.Resampling.NEAREST)
    inside = np.asarray(mask) >= 128
    if not inside.any():
        raise ValueError("edit: the subject mask is empty (nothing to keep)")
    if inside.all():
        raise ValueError("edit: the subject mask covers the whole image (no background)")
    kept = blend_alpha(mask, request.blend_margin)
    # The margin is repainted too (everything not kept whole), so that the blend there mixes
    # the subject with new background rather than with itself.
    repaint = Image.fromarray(np.where(kept >= 1.0, 0, 255).astype(np.uint8))
    render = RenderRequest(
        prompt=request.prompt,
        seed=request.seed,
        loras=request.loras,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt,
        width=size[0],
        height=size[1],
        conditioning=Conditioning("inpaint", original, mask=repaint, strength=request.strength),
    )
    painted = engine.render_batch([render])[0]
    background = np.asarray(painted, np.float32)
    if request.shadow:
        shade = ground_shadow(mask, request.shadow_opacity) * (~inside)
        background = background * (1.0 - shade[..., None])
    composite = Image.fromarray(np.round(background).clip(0, 255).astype(np.uint8))
    relit = None
    if request.relight:
        if relighter is None:
            raise ConfigError("edit: relight needs a Relighter (IC-Light or its stand-in)")
        relit = relighter.relight(
            composite,
            mask,
            request.prompt,
            request.seed,
            # The relighting pass takes as many steps as the background did.
            steps=int(json.loads(painted.info[SIDECAR_KEY])["steps"]),
            strength=request.relight_strength,
            negative_prompt=request.negative_prompt,
        )
        background = np.asarray(relit.resize(size), np.float32)
    alpha = kept * request.subject_blend
    weight = alpha[..., None]
    blended = np.asarray(original, np.float32) * weight + background * (1.0 - weight)
    image = Image.fromarray(np.round(blended).clip(0, 255).astype(np.uint8))
    image.info.update(painted.info)
    return EditResult(image, original, mask, composite, alpha, relit)


def make_relighter(
    engine: GenerationEngine, iclight_path: str | None, variant: IcLightVariant = "fc"
) -> Relighter:
    """IC-Light from a local file; without one only a stand-in base gets the stand-in."""
    if not iclight_path and not engine.base.stand_in:
        raise ConfigError(
            "edit: relighting a real base model needs a local IC-Light file (--iclight); "
            "nothing is downloaded"
        )
    return Relighter.for_pipeline(engine.pipeline, iclight_path, variant)


def contact_sheet(result: EditResult, title: str, stand_in: bool, cell: int = 128) -> Image.Image:
    """Before / mask / background / (relit) / after side by side, labelled."""
    panels = result.panels()
    header = 30
    sheet = Image.new("RGB", (cell * len(panels), header + cell), "white")
    draw = ImageDraw.Draw(sheet)
    caption = title + (" (stand-in model: images mean nothing)" if stand_in else "")
    draw.text((4, 2), caption, fill="black")
    for column, (label, panel) in enumerate(panels):
        draw.text((column * cell + 4, 16), label, fill="black")
        thumbnail = panel.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(thumbnail, (column * cell, header))
    return sheet


def write_edit(result: EditResult, out: str | Path, title: str, stand_in: bool) -> dict[str, Path]:
    """The edited PNG (parameters + sidecar), its subject mask and the before/after sheet."""
    out = Path(out)
    paths = {
        "image": out,
        "mask": out.with_name(f"{out.stem}.mask.png"),
        "sheet": out.with_name(f"{out.stem}.sheet.png"),
    }
    write_image(paths["image"], result.image)
    write_png(paths["mask"], result.subject_mask)
    write_png(paths["sheet"], contact_sheet(result, title, stand_in))
    return paths


def edit_summary(result: EditResult) -> dict[str, Any]:
    """Numbers a caller (CLI, HTTP) reports: the subject's share, and the share kept whole."""
    inside = np.asarray(result.subject_mask) >= 128
    return {
        "subject_fraction": round(float(inside.mean()), 6),
        "fully_kept_fraction": round(float((result.alpha >= 1.0).mean()), 6),
    }
