"""UNet module paths in the original (SGM / LDM) checkpoint layout, from diffusers' paths.

kohya's sd-scripts trains SDXL on its own copy of the original UNet, so its SDXL LoRA files name
modules `input_blocks.N.M...`, `middle_block.N...` and `output_blocks.N.M...`; A1111, ComfyUI,
kohya and diffusers all read that naming for SDXL. (A1111 converts diffusers-named SDXL keys with
SD1's up-sampler rule and misses `up_blocks.0.upsamplers.0.conv`, so diffusers names are not
enough there.)

The layout, as the original UNet builds it: `input_blocks.0` is conv_in; each down block then
contributes one input block per resnet (`.0` the resnet, `.1` its transformer, if any) and one
for its down-sampler (`.0.op`); the middle block is resnet, transformer, resnet; each up block
contributes one output block per resnet (one more resnet than a down block), the last of which
also holds the up-sampler (`.1.conv`, or `.2.conv` after a transformer). Resnet layers have
their own names (`in_layers.2` is conv1, ...); transformer paths are the same in both layouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# CLIP's text tower lives under `text_model` in the original checkpoints and in every tool's
# key rules (`cond_stage_model.transformer.text_model.encoder...`); transformers 5 flattened
# CLIPTextModel (its modules start at `encoder.`) but not CLIPTextModelWithProjection.
TEXT_MODEL_LEVEL = "text_model"
TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")
# A diffusers ResnetBlock2D's layers as the original ResBlock names them.
RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the blocks.
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/pooled-text conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv")


@dataclass(frozen=True)
class UnetLayout:
    """What the renaming needs to know of a UNet: resnets per down block, and which up blocks
    have transformers (that moves their up-sampler from `.1` to `.2`)."""

    layers_per_block: int
    up_blocks_with_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UnetLayout:
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            if len(set(layers)) != 1:
                raise ValueError(f"no original layout for per-block layers_per_block {layers}")
            layers = layers[0]
        up = tuple("CrossAttn" in block for block in config["up_block_types"])
        return cls(layers_per_block=int(layers), up_blocks_with_attention=up)


def _resnet_layer(rest: str) -> str:
    head, dot, tail = rest.partition(".")
    return RESNET_LAYERS.get(head, head) + dot + tail


def sgm_module_path(path: str, layout: UnetLayout) -> str:
    """The original checkpoint's name for a diffusers UNet module path."""
    if path in TOP_LEVEL:
        return TOP_LEVEL[path]
    # Input blocks per down block: its resnets and its down-sampler; output blocks per up block:
    # its resnets (one more than a down block has), the last one holding the up-sampler.
    per_block = layout.layers_per_block + 1
    if match := _BLOCK.fullmatch(path):
        blocks, block, kind, index, rest = match.groups()
        block, index = int(block), int(index)
        number = (
            1 + block * per_block + index if blocks == "down_blocks" else block * per_block + index
        )
        name = "input_blocks" if blocks == "down_blocks" else "output_blocks"
        if kind == "resnets":
            return f"{name}.{number}.0.{_resnet_layer(rest)}"
        return f"{name}.{number}.1.{rest}"
    if match := _MID.fullmatch(path):
        kind, index, rest = match.groups()
        if kind == "resnets":
            return f"middle_block.{2 * int(index)}.{_resnet_layer(rest)}"
        return f"middle_block.1.{rest}"
    if match := _SAMPLER.fullmatch(path):
        blocks, block, _ = match.groups()
        block = int(block)
        if blocks == "down_blocks":
            return f"input_blocks.{(block + 1) * per_block}.0.op"
        slot = 2 if layout.up_blocks_with_attention[block] else 1
        return f"output_blocks.{block * per_block + layout.layers_per_block}.{slot}.conv"
    raise ValueError(f"UNet module {path!r} has no name in the original checkpoint layout")
