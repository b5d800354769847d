"""The diffusion objective's loss weights, shared by the world's pretraining (models/
world_diffusion) and the LoRA trainer (train/loss)."""

from __future__ import annotations

from typing import Any

import torch


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for noise
    prediction, min(SNR, gamma) / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
