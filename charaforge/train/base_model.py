"""The base model, loaded, frozen and checked once per grid: every candidate trains its own
LoRA on the same frozen weights, which no candidate changes (adapters are removed after each)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charaforge.config import TrainConfig, config_hash
from charaforge.models.base import BaseInfo, load_base_pipeline, pipeline_location, read_base_info
from charaforge.train.caches import component_fingerprint
from charaforge.train.checks import check_candidates
from charaforge.train.text import text_encoders


def model_fingerprint(location: Path) -> str:
    """A content hash of every component folder of the diffusers pipeline."""
    parts = sorted(p.name for p in location.iterdir() if p.is_dir())
    return config_hash({part: component_fingerprint(location / part) for part in parts})


@dataclass
class FrozenBase:
    """The loaded pipeline with every weight frozen, the training noise scheduler, and what the
    base contributes to a run's identity."""

    pipeline: Any
    info: BaseInfo
    location: Path  # the diffusers folder (the stand-in's copy or the local real weights)
    noise_scheduler: Any  # DDPM with the pipeline's schedule: add_noise, SNR, velocity
    fingerprint: str

    @classmethod
    def load(cls, base_dir: str | Path, train: TrainConfig, resolution: int) -> FrozenBase:
        """Load the base model, check every candidate against it, and freeze it.

        On a GPU with mixed precision the frozen UNet and text encoders go to half precision
        (the VRAM saving); the SDXL VAE overflows in fp16, so it stays in float32.
        """
        from diffusers import DDPMScheduler

        info = read_base_info(base_dir)
        pipeline = load_base_pipeline(base_dir)
        check_candidates(pipeline, train, resolution)
        encoders = text_encoders(pipeline)
        for module in (pipeline.vae, pipeline.unet, *encoders):
            module.requires_grad_(False)
        if pipeline.unet.device.type == "cuda" and train.mixed_precision != "no":
            weight_dtype = torch.float16 if train.mixed_precision == "fp16" else torch.bfloat16
            for module in (pipeline.unet, *encoders):
                module.to(dtype=weight_dtype)
        location = pipeline_location(base_dir)
        return cls(
            pipeline=pipeline,
            info=info,
            location=location,
            noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
            fingerprint=model_fingerprint(location),
        )

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return text_encoders(self.pipeline)

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device
