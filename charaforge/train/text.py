"""Text conditioning as the SD1.5 and SDXL pipelines compute it, and SDXL's size conditioning."""

from __future__ import annotations

from typing import Any

import torch

from charaforge.models.clip_skip import sd15_states, sdxl_states
from charaforge.train.data import Item

# The pipeline attributes of the text encoders, in the order SDXL concatenates their states.
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def text_encoders(pipeline: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders (one for SD1.5, two for SDXL)."""
    encoders = [pipeline.text_encoder]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        encoders.append(pipeline.text_encoder_2)
    return encoders


def tokenizers(pipeline: Any) -> list[Any]:
    """The tokenizers, paired with `text_encoders`."""
    found = [pipeline.tokenizer]
    if getattr(pipeline, "tokenizer_2", None) is not None:
        found.append(pipeline.tokenizer_2)
    return found


def encode_captions(
    pipeline: Any,
    family: str,
    captions: list[str],
    clip_skip: int = 1,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Text conditioning as the pipelines compute it at an A1111 `clip_skip` (1 = last layer):
    SD1.5's hidden state through the final layer norm; SDXL's two hidden states side by side
    (penultimate at clip skip 1) plus text_encoder_2's pooled projection (never skipped).

    One caption at a time, so a batch gives the very bits the cache holds per caption.
    `device`: where the ids go (default: the UNet's). The trainer passes its own, because
    diffusers' `ModelMixin.device` walks every module for offload hooks, which was 5% of a world
    LoRA step when asked per batch.
    """
    device = pipeline.unet.device if device is None else device
    states, pooled = [], []
    for caption in captions:
        parts = []
        for tokenizer, encoder in zip(tokenizers(pipeline), text_encoders(pipeline), strict=True):
            ids = tokenizer(
                [caption],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            if family == "sd15":
                parts.append(sd15_states(encoder, ids, clip_skip))
            else:
                output = encoder(ids, output_hidden_states=True)
                parts.append(sdxl_states(output.hidden_states, clip_skip))
                last_pooled = output[0]  # text_encoder_2's text_embeds (the last encoder's)
        states.append(torch.cat(parts, dim=-1))
        if family == "sdxl":
            pooled.append(last_pooled)
    encoded = {"states": torch.cat(states)}
    if family == "sdxl":
        encoded["pooled"] = torch.cat(pooled)
    return encoded


def sdxl_time_ids(items: list[Item]) -> torch.Tensor:
    """SDXL's micro-conditioning per image: original size, crop corner, target size."""
    return torch.tensor(
        [[*item.original, *item.crop, item.size[1], item.size[0]] for item in items],
        dtype=torch.float32,
    )
