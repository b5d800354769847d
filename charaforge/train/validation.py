"""Validation: a deterministic loss on the val split, and sample images from fixed prompts and
seeds (the same problem for every checkpoint of every candidate, so the numbers compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL.PngImagePlugin import PngInfo

from charaforge.config import TrainConfig
from charaforge.core.files import atomic_path, derive_seed, write_png
from charaforge.train.data import Item
from charaforge.train.encodings import Encoded
from charaforge.train.loss import diffusion_loss
from charaforge.train.text import sdxl_time_ids

# The fixed timesteps the validation loss averages over (early to late in the schedule).
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)


def validation_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    items: list[Item],
    encoded: list[Encoded],
    scaling_factor: float,
    family: str,
    seed: int,
) -> float:
    """Mean noise-prediction MSE on the val split at fixed timesteps and fixed noise.

    The noise comes from a generator re-seeded on every call and shared by all candidates, and
    the latents are the posterior means: every checkpoint of every candidate is measured on
    exactly the same problem, so the numbers compare (and rise when a LoRA over-fits).
    """
    generator = torch.Generator("cpu").manual_seed(derive_seed(seed, "validation"))
    device = unet.device
    was_training = unet.training
    unet.eval()
    # One batch per bucket (images of one size), in a fixed order.
    groups: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.size, []).append(index)
    losses, counts = [], []
    with torch.no_grad():
        for _, members in sorted(groups.items()):
            means = [encoded[i].latent_parameters.chunk(2, dim=0)[0] for i in members]
            latents = torch.stack(means).to(device) * scaling_factor
            time_ids = (
                sdxl_time_ids([items[i] for i in members]).to(device) if family == "sdxl" else None
            )
            text = {
                key: torch.cat([encoded[i].text[key] for i in members]).to(device)
                for key in encoded[members[0]].text
            }
            for timestep in VALIDATION_TIMESTEPS:
                noise = torch.randn(latents.shape, generator=generator).to(device)
                timesteps = torch.full((len(members),), timestep, dtype=torch.long, device=device)
                loss = diffusion_loss(
                    unet, noise_scheduler, latents, text, time_ids, noise, timesteps, None
                )
                losses.append(float(loss) * len(members))
                counts.append(len(members))
    unet.train(was_training)
    return float(sum(losses) / sum(counts))


def render_samples(
    pipeline: Any,
    train: TrainConfig,
    resolution: int,
    seed: int,
    trigger: str | None,
    out_dir: Path,
    stand_in: bool,
) -> None:
    """Sample images from the fixed prompts and seeds (the same for every step and candidate)."""
    with atomic_path(out_dir) as temp:
        temp.mkdir(parents=True)
        for prompt_index, template in enumerate(train.validation.sample_prompts):
            prompt = template.replace("{trigger}", trigger or "")
            for sample_seed in train.validation.sample_seeds:
                generator = torch.Generator("cpu").manual_seed(
                    derive_seed(seed, "train_sample", prompt_index, sample_seed)
                )
                with torch.no_grad():
                    image = pipeline(
                        prompt,
                        num_inference_steps=train.validation.sample_steps,
                        guidance_scale=train.validation.sample_guidance_scale,
                        generator=generator,
                        height=resolution,
                        width=resolution,
                    ).images[0]
                info = PngInfo()
                info.add_text("parameters", f"{prompt}\nSeed: {sample_seed}")
                # Anything a stand-in model drew says so, in the file itself.
                info.add_text("charaforge.stand_in", str(stand_in).lower())
                write_png(temp / f"p{prompt_index}-s{sample_seed}.png", image, pnginfo=info)
