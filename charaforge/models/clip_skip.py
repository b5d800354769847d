"""Clip skip, counted as A1111 counts it (1 = the text encoder's last layer), in one place for
the trainer's text conditioning and the engine's prompts.

diffusers' `encode_prompt(clip_skip=k)` counts layers *skipped*: SD1.5 takes
`hidden_states[-(k + 1)]` through the final layer norm, SDXL `hidden_states[-(k + 2)]` (it
already starts from the penultimate layer) without it. A1111's clip skip N is diffusers' N - 1.
"""

from __future__ import annotations

from typing import Any

import torch


def diffusers_clip_skip(clip_skip: int) -> int | None:
    """A1111's clip skip as diffusers' `clip_skip` argument (None: no layer skipped)."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip counts from 1 (the last layer), got {clip_skip}")
    return clip_skip - 1 or None


def text_layer_count(encoder: Any) -> int:
    """How many transformer layers a CLIP text encoder has (the largest clip skip it takes)."""
    return int(encoder.config.num_hidden_layers)


def final_layer_norm(encoder: Any) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no `text_model` level); older ones nest it.
    owner = getattr(encoder, "text_model", encoder)
    return owner.final_layer_norm


def sd15_states(encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """SD1.5's prompt states at an A1111 clip skip, as StableDiffusionPipeline computes them."""
    skipped = diffusers_clip_skip(clip_skip)
    if skipped is None:
        return encoder(ids)[0]
    hidden = encoder(ids, output_hidden_states=True).hidden_states
    return final_layer_norm(encoder)(hidden[-(skipped + 1)])


def sdxl_states(hidden_states: tuple[torch.Tensor, ...], clip_skip: int) -> torch.Tensor:
    """One SDXL encoder's prompt states at an A1111 clip skip (no final layer norm, as in
    StableDiffusionXLPipeline: clip skip 1 is its default penultimate layer)."""
    skipped = diffusers_clip_skip(clip_skip)
    return hidden_states[-((skipped or 0) + 2)]
