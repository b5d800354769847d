"""Conditioning inputs for the engine: image and mask files, and the stand-in ControlNet used
with a stand-in base model (the control maps themselves are made in generate.controls).

The stand-in ControlNet is the real diffusers ControlNetModel shaped after the base UNet, with
random weights from a fixed seed. A trained ControlNet starts with zero-initialised output
convolutions (it has no effect until trained); the stand-in draws them at random too, so that a
pose really changes the stand-in's image and every code path downstream is exercised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from charaforge.core.files import derive_seed
from charaforge.errors import ConfigError
from charaforge.generate.request import ControlUnit
from charaforge.models.loading import WEIGHTS_LOADING_LOCK

# Small conditioning encoder: four blocks = three stride-2 steps, i.e. 8x down to latent size.
STAND_IN_EMBEDDING_CHANNELS = (8, 16, 16, 16)
STAND_IN_OUTPUT_STD = 0.02


def build_stand_in_controlnet(unet: Any, control_type: str) -> Any:
    """A ControlNet with the base UNet's shape and deterministic random weights.

    Built from the UNet's config only (not its weights), so it does not matter which LoRAs are
    attached to the UNet at the time.
    """
    import torch
    from diffusers import ControlNetModel

    seed = derive_seed("stand_in", "controlnet", control_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=STAND_IN_EMBEDDING_CHANNELS,
            load_weights_from_unet=False,
        )
        with torch.no_grad():
            outputs = [*model.controlnet_down_blocks, model.controlnet_mid_block]
            outputs.append(model.controlnet_cond_embedding.conv_out)
            for layer in outputs:
                layer.weight.normal_(0.0, STAND_IN_OUTPUT_STD)
    # Built in float32 like the stand-in UNet; only the device needs to follow it.
    return model.to(unet.device)


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None


def mask_image(path: str | Path) -> Image.Image:
    """An inpainting mask: white where the image is repainted."""
    return load_image(path).convert("L")


def control_arguments(units: Sequence[ControlUnit], size: tuple[int, int]) -> dict[str, Any]:
    """The ControlNet pipeline's arguments for one or several units, maps resized to `size`.

    One unit passes plain values (a single ControlNetModel); several pass lists in unit order
    (diffusers' MultiControlNetModel).
    """
    images = [unit.image.convert("RGB").resize(size, Image.Resampling.BICUBIC) for unit in units]
    scales = [float(unit.conditioning_scale) for unit in units]
    starts = [float(unit.guidance_start) for unit in units]
    ends = [float(unit.guidance_end) for unit in units]
    if len(units) == 1:
        return {
            "image": images[0],
            "controlnet_conditioning_scale": scales[0],
            "control_guidance_start": starts[0],
            "control_guidance_end": ends[0],
        }
    return {
        "image": images,
        "controlnet_conditioning_scale": scales,
        "control_guidance_start": starts,
        "control_guidance_end": ends,
    }


def combine_controlnets(models: Sequence[Any]) -> Any:
    """One ControlNet as is; several as a MultiControlNetModel (their residuals summed)."""
    if len(models) == 1:
        return models[0]
    from diffusers import MultiControlNetModel

    return MultiControlNetModel(list(models))


def load_controlnet(control_type: str, path: Path | None, unet: Any, stand_in: bool) -> Any:
    """The ControlNet for a conditioning type: a local model (`path`, resolved), or beside a
    stand-in base a stand-in ControlNet built deterministically from its UNet (random weights,
    the real class)."""
    if path is not None:
        from diffusers import ControlNetModel

        with WEIGHTS_LOADING_LOCK:
            return ControlNetModel.from_pretrained(path, dtype=unet.dtype).eval()
    if stand_in:
        with WEIGHTS_LOADING_LOCK:  # no load in another thread may be patching Module meanwhile
            return build_stand_in_controlnet(unet, control_type).eval()
    raise ConfigError(
        f"eval.controlnets.{control_type}: no local ControlNet given for a real base model "
        "(nothing is downloaded)"
    )
