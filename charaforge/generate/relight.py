"""IC-Light relighting: a UNet that reads the noisy latent plus the subject's (and background's)
latents, from a local file, or a stand-in of that shape.

IC-Light (lllyasviel) is an SD1.5 UNet whose first convolution takes extra channels: `fc`
(foreground-conditioned) 8 = noisy latent + foreground latent, `fbc` (foreground and background)
12 = + background latent. Its files hold *offsets*: the weights are the base UNet's plus the file's,
with the base's first convolution widened by zero channels first. The foreground is the subject on
middle grey (IC-Light's convention: a black surround darkens the relit image).

The relighting pass here is an image-to-image loop over the composite, with the extra latents
concatenated to the noisy latent at every step (what IC-Light's own pipeline does by hooking the
UNet's forward). Images are byte-reproducible on the CPU: one CPU generator per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from charaforge.core.files import derive_seed
from charaforge.errors import ConfigError

IcLightVariant = Literal["fc", "fbc"]
EXTRA_CHANNELS: dict[str, int] = {"fc": 4, "fbc": 8}
STAND_IN_OUTPUT_STD = 0.02


def widened_unet(base_unet: Any, variant: IcLightVariant) -> Any:
    """A UNet2DConditionModel like `base_unet` whose conv_in reads the IC-Light channels; the
    base weights copied, the new input channels zero (so it equals the base until trained)."""
    from diffusers import UNet2DConditionModel

    latent = int(base_unet.config.in_channels)
    config = dict(base_unet.config)
    config["in_channels"] = latent + EXTRA_CHANNELS[variant]
    unet = UNet2DConditionModel.from_config(config)
    state = base_unet.state_dict()
    weight = state["conv_in.weight"]
    widened = torch.zeros(weight.shape[0], config["in_channels"], *weight.shape[2:])
    widened[:, :latent] = weight
    state["conv_in.weight"] = widened
    unet.load_state_dict(state)
    return unet.to(device=base_unet.device, dtype=base_unet.dtype).eval()


def load_iclight(path: str | Path, base_unet: Any) -> tuple[Any, IcLightVariant]:
    """IC-Light from its offsets file (`iclight_sd15_fc.safetensors`, `..._fbc...`): the variant is
    read from conv_in's width; every weight is base + offset, as IC-Light merges them."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"relight.iclight_path: {path} is not a file")
    offsets = load_file(str(path))
    if "conv_in.weight" not in offsets:
        raise ConfigError(f"{path}: not an IC-Light UNet offsets file (no conv_in.weight)")
    extra = offsets["conv_in.weight"].shape[1] - int(base_unet.config.in_channels)
    variants = {channels: name for name, channels in EXTRA_CHANNELS.items()}
    if extra not in variants:
        raise ConfigError(f"{path}: conv_in reads {extra} extra channels; IC-Light has 4 or 8")
    variant: IcLightVariant = variants[extra]  # type: ignore[assignment]
    unet = widened_unet(base_unet, variant)
    state = unet.state_dict()
    missing = sorted(set(state) - set(offsets))
    if missing:
        raise ConfigError(f"{path}: offsets missing for {len(missing)} weights, e.g. {missing[0]}")
    unet.load_state_dict({key: state[key] + offsets[key].to(state[key]) for key in state})
    return unet, variant


def build_stand_in_iclight(base_unet: Any, variant: IcLightVariant = "fc") -> Any:
    """IC-Light's shape with seeded random weights on the extra input channels (the base UNet's
    weights elsewhere): the subject latents really change the result, and mean nothing."""
    unet = widened_unet(base_unet, variant)
    latent = int(base_unet.config.in_channels)
    generator = torch.Generator("cpu").manual_seed(derive_seed("stand_in", "iclight", variant))
    with torch.no_grad():
        extra = unet.conv_in.weight[:, latent:]
        noise = torch.randn(extra.shape, generator=generator) * STAND_IN_OUTPUT_STD
        extra.copy_(noise.to(extra))
    return unet


@dataclass
class Relighter:
    """The relighting pass over the engine's base pipeline (its VAE, text encoder, scheduler)."""

    pipeline: Any
    unet: Any
    variant: IcLightVariant
    stand_in: bool

    @classmethod
    def for_pipeline(
        cls, pipeline: Any, iclight_path: str | None, variant: IcLightVariant = "fc"
    ) -> Relighter:
        """IC-Light from a local offsets file, else (only for a stand-in base) the stand-in."""
        if iclight_path:
            unet, found = load_iclight(iclight_path, pipeline.unet)
            return cls(pipeline, unet, found, stand_in=False)
        return cls(pipeline, build_stand_in_iclight(pipeline.unet, variant), variant, True)

    def _latents(self, image: Image.Image, device: Any) -> torch.Tensor:
        pixels = self.pipeline.image_processor.preprocess(image).to(device, self.unet.dtype)
        vae = self.pipeline.vae
        # The distribution's mean, not a sample: the same image always gives the same latent.
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def relight(
        self,
        composite: Image.Image,
        subject_mask: Image.Image,
        prompt: str,
        seed: int,
        steps: int = 20,
        strength: float = 0.5,
        guidance_scale: float = 2.0,
        negative_prompt: str = "",
        background: Image.Image | None = None,
    ) -> Image.Image:
        """The composite relit to match `prompt` (image-to-image at `strength`)."""
        from diffusers import EulerDiscreteScheduler

        if not 0.0 < strength <= 1.0:
            raise ValueError(f"relight strength must be in (0, 1], got {strength}")
        device = self.unet.device
        alpha = np.asarray(subject_mask.convert("L"), np.float32)[..., None] / 255.0
        rgb = np.asarray(composite.convert("RGB"), np.float32)
        foreground = Image.fromarray(np.round(rgb * alpha + 127.0 * (1 - alpha)).astype(np.uint8))
        extra = [self._latents(foreground, device)]
        if self.variant == "fbc":
            extra.append(self._latents(background or composite, device))
        concat = torch.cat(extra, dim=1)
        do_cfg = guidance_scale > 1.0
        embeds, negative = self.pipeline.encode_prompt(
            prompt, device, 1, do_cfg, negative_prompt=negative_prompt or None
        )
        if do_cfg:
            embeds = torch.cat([negative, embeds])
            concat = torch.cat([concat, concat])
        scheduler = EulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        start = steps - max(1, min(steps, round(steps * strength)))
        timesteps = scheduler.timesteps[start:]
        scheduler.set_begin_index(start)
        latents = self._latents(composite, device)
        generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        latents = scheduler.add_noise(latents, noise, timesteps[:1])
        for timestep in timesteps:
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            model_input = torch.cat([model_input, concat], dim=1)
            predicted = self.unet(model_input, timestep, encoder_hidden_states=embeds).sample
            if do_cfg:
                unconditional, conditional = predicted.chunk(2)
                predicted = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(predicted, timestep, latents).prev_sample
        vae = self.pipeline.vae
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
        return self.pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
