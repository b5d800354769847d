"""What every image carries: A1111's `parameters` PNG chunk and the full-parameter JSON sidecar."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from charaforge.core.files import write_json, write_png

PARAMETERS_KEY = "parameters"


SIDECAR_KEY = "charaforge"


def fused_batch_record(members: list[dict[str, Any]]) -> dict[str, Any]:
    """What a fused-mode image's bytes also depend on: the batch it ran in (its size and its
    members' parameters, in order). Kept in the sidecar, so a rerun reuses an image only when
    it would run in the very same batch."""
    text = json.dumps(members, sort_keys=True)
    return {"size": len(members), "members": hashlib.sha256(text.encode()).hexdigest()[:16]}


def batch_key(params: dict[str, Any]) -> str:
    """What the images of one batch must share (everything but prompt, seed and clip skip)."""
    shared = {
        key: value
        for key, value in params.items()
        if key
        not in {
            "prompt",
            "negative_prompt",
            "seed",
            "clip_skip",
            "trigger_words",
            "conditioning",
            "consistency",  # a group's identity shot and frames differ here (checked apart)
        }
    }
    return json.dumps(shared, sort_keys=True)


def a1111_parameters(params: dict[str, Any]) -> str:
    """The `parameters` text A1111 writes (and its PNG Info tab and ComfyUI read back)."""
    # A1111 finds a LoRA by the file stem it lists (the kohya file of a checkpoint), and
    # repairs a missing one by the hash; both name the file A1111 loads, not our adapter.
    names = [lora.get("a1111_name") or lora["name"] for lora in params["loras"]]
    prompt = params["prompt"] + "".join(
        f" <lora:{name}:{lora['scale']:g}>"
        for name, lora in zip(names, params["loras"], strict=True)
    )
    fields = [
        f"Steps: {params['steps']}",
        f"Sampler: {params['sampler']}",
        f"CFG scale: {params['guidance_scale']:g}",
        f"Seed: {params['seed']}",
        f"Size: {params['width']}x{params['height']}",
        f"Model: {params['model']}",
    ]
    if params.get("clip_skip", 1) != 1:
        fields.append(f"Clip skip: {params['clip_skip']}")
    conditioning = params.get("conditioning")
    if conditioning and conditioning["kind"] != "control":
        fields.append(f"Denoising strength: {conditioning['strength']:g}")
    if conditioning and conditioning["kind"] == "control":
        fields.append(
            f'ControlNet 0: "Module: {conditioning["control_type"]}, '
            f'Weight: {conditioning["conditioning_scale"]:g}"'
        )
        for index, unit in enumerate(conditioning.get("controls", []), start=1):
            fields.append(
                f'ControlNet {index}: "Module: {unit["control_type"]}, '
                f"Weight: {unit['conditioning_scale']:g}, Guidance Start: "
                f'{unit["guidance_start"]:g}, Guidance End: {unit["guidance_end"]:g}"'
            )
    if params["loras"]:
        hashes = ", ".join(
            f"{name}: {lora['short_hash']}"
            for name, lora in zip(names, params["loras"], strict=True)
        )
        fields.append(f'Lora hashes: "{hashes}"')
    lines = [prompt]
    if params["negative_prompt"]:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_bytes(image: Image.Image) -> bytes:
    """The PNG (with its `parameters` chunk) as bytes, exactly as `write_image` writes it."""

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(image), optimize=False, compress_level=6)
    return buffer.getvalue()


def _png_info(image: Image.Image) -> PngInfo:
    info = PngInfo()
    if PARAMETERS_KEY in image.info:
        info.add_text(PARAMETERS_KEY, image.info[PARAMETERS_KEY])
    return info


def write_image(path: str | Path, image: Image.Image) -> None:
    """The PNG with its `parameters` chunk, and `<name>.json` beside it with the full parameters.

    The sidecar is written first: a PNG on disk always has its sidecar (resume relies on it).
    """
    path = Path(path)
    if SIDECAR_KEY in image.info:
        write_json(path.with_suffix(".json"), json.loads(image.info[SIDECAR_KEY]))
    write_png(path, image, pnginfo=_png_info(image))


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
