"""The diffusion training objective, step by step as in diffusers' LoRA example: a latent drawn
from the image's posterior, noise (plus offset noise), timesteps, the target by prediction type,
and the per-sample min-SNR weights."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from charaforge.models.objective import min_snr_weights


def noisy_inputs(
    latent_parameters: torch.Tensor,
    scaling_factor: float,
    noise_offset: float,
    num_train_timesteps: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (a fresh sample from each image's posterior), noise and timesteps.

    Every draw comes from `generator` in this order: latent sample, noise, offset noise,
    timesteps. Reordering them changes every number after.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # diffusers' own posterior (it clamps the log-variance as the VAE does); the parameters are
    # float32 on the CPU, so its draw is exactly `torch.randn(mean.shape, generator=generator)`.
    posterior = DiagonalGaussianDistribution(latent_parameters.float())
    latents = (posterior.sample(generator=generator) * scaling_factor).to(device)
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        # Offset noise (Guttenberg 2023): one extra draw per image and channel, so the model
        # can learn overall brightness.
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (len(latents),), generator=generator)
    return latents, noise.to(device), timesteps.to(device)


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    text: dict[str, torch.Tensor],
    time_ids: torch.Tensor | None,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """The noise-prediction (or v-prediction) MSE, per-sample weighted by min-SNR when asked."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = (
        noise_scheduler.get_velocity(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction"
        else noise
    )
    extra = {}
    if time_ids is not None:
        extra["added_cond_kwargs"] = {"text_embeds": text["pooled"], "time_ids": time_ids}
    prediction = unet(noisy_latents, timesteps, text["states"], **extra).sample
    if min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma)).mean()
