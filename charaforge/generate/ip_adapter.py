"""IP-Adapter (image prompt) weights: local files in the layout diffusers' `load_ip_adapter`
reads, and a stand-in built from a seed like the other stand-ins.

The layout is the one of the published IP-Adapter repositories (h94/IP-Adapter `models/`): one
weight file whose keys are `image_proj.*` (the projection of the CLIP image embedding to four
extra cross-attention tokens: `proj.weight`, `proj.bias`, `norm.weight`, `norm.bias`) and
`ip_adapter.<n>.to_k_ip.weight` / `.to_v_ip.weight` (the key and value projections of those
tokens, numbered 1, 3, 5, ... over the UNet's attention processors in order, the cross-attention
ones being the odd ones), and beside it `image_encoder/`, a CLIPVisionModelWithProjection.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from charaforge.core.files import derive_seed
from charaforge.errors import ConfigError
from charaforge.models.loading import WEIGHTS_LOADING_LOCK

STAND_IN_WEIGHT_NAME = "ip-adapter_stand-in.safetensors"
IMAGE_ENCODER_DIR = "image_encoder"
IMAGE_TOKENS = 4  # the plain IP-Adapter's number of image tokens
STAND_IN_IMAGE_SIZE = 32
STAND_IN_EMBED_DIM = 32


def _hidden_size(unet: Any, name: str) -> int:
    """The channel width of the block an attention processor sits in (diffusers' own rule)."""
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def ip_adapter_state_dict(unet: Any, image_embed_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights shaped for `unet`, with the published key names."""
    cross_dim = int(unet.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(derive_seed(seed, "stand_in", "ip_adapter"))

    def weight(rows: int, columns: int) -> torch.Tensor:
        # nn.Linear's default scale (uniform in +-1/sqrt(fan_in)), drawn from our generator.
        bound = 1.0 / columns**0.5
        return (torch.rand(rows, columns, generator=generator) * 2 - 1) * bound

    state = {
        "image_proj.proj.weight": weight(IMAGE_TOKENS * cross_dim, image_embed_dim),
        "image_proj.proj.bias": torch.zeros(IMAGE_TOKENS * cross_dim),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = weight(hidden, cross_dim)
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = weight(hidden, cross_dim)
        key_id += 2
    return state


def build_stand_in_ip_adapter(unet: Any, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a stand-in IP-Adapter for `unet` into out_dir (weight file + image_encoder/).

    The image encoder is the real CLIPVisionModelWithProjection class at a tiny size with
    seeded random weights. Returns the weight file's path.
    """
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=STAND_IN_IMAGE_SIZE,
        patch_size=8,
        projection_dim=STAND_IN_EMBED_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "stand_in", "ip_adapter", "image_encoder"))
        encoder = CLIPVisionModelWithProjection(config).eval()
    encoder.save_pretrained(out_dir / IMAGE_ENCODER_DIR, safe_serialization=True)
    weights = out_dir / STAND_IN_WEIGHT_NAME
    state = ip_adapter_state_dict(unet, STAND_IN_EMBED_DIM, seed)
    save_file({key: value.contiguous() for key, value in state.items()}, str(weights))
    return weights


def load_ip_adapter(pipeline: Any, weights: str | Path) -> None:
    """diffusers' `load_ip_adapter` from a local weight file with `image_encoder/` beside it."""
    weights = Path(weights)
    if not weights.is_file():
        raise ConfigError(f"ip_adapter: weight file {weights} not found (nothing is downloaded)")
    if not (weights.parent / IMAGE_ENCODER_DIR / "config.json").is_file():
        raise ConfigError(
            f"ip_adapter: no {IMAGE_ENCODER_DIR}/ beside {weights} (a CLIPVisionModelWithProjection"
            " folder, as in the IP-Adapter repositories)"
        )
    with WEIGHTS_LOADING_LOCK:
        pipeline.load_ip_adapter(
            str(weights.parent),
            subfolder="",
            weight_name=weights.name,
            image_encoder_folder=IMAGE_ENCODER_DIR,
            local_files_only=True,
        )


def load_for_engine(pipeline: Any, weights: str | Path | None, stand_in: bool) -> None:
    """The engine's IP-Adapter: the local weight file, or with a stand-in base a stand-in
    adapter built for its UNet (written to a temporary folder and read by the real loader)."""
    if weights:
        load_ip_adapter(pipeline, weights)
    elif stand_in:
        with WEIGHTS_LOADING_LOCK, tempfile.TemporaryDirectory() as folder:
            load_ip_adapter(pipeline, build_stand_in_ip_adapter(pipeline.unet, folder))
    else:
        raise ConfigError(
            "ip_adapter: no local IP-Adapter weight file given for a real base model "
            "(eval.ip_adapter or --ip-adapter; nothing is downloaded)"
        )
    pipeline.image_encoder.eval()


def image_prompt_arguments(pipeline: Any, image_prompt: Any) -> dict[str, Any]:
    """The pipeline arguments of an image prompt (an `ImagePrompt` or None) at its scale. Once an
    adapter is loaded the UNet needs image tokens, so a request without a reference runs it with
    a black image at scale 0, which adds exactly nothing."""
    if image_prompt is None:
        size = int(pipeline.image_encoder.config.image_size)
        pipeline.set_ip_adapter_scale(0.0)
        return {"ip_adapter_image": Image.new("RGB", (size, size))}
    pipeline.set_ip_adapter_scale(float(image_prompt.scale))
    return {"ip_adapter_image": image_prompt.image.convert("RGB")}
