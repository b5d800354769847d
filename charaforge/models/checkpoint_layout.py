"""A diffusers pipeline's weights in the original single-file checkpoint layout (LDM / SGM), the
`.safetensors` that A1111, ComfyUI and diffusers' `from_single_file` load.

The UNet uses the block renaming of `sgm_names` (`model.diffusion_model.input_blocks...`); the VAE
the LDM autoencoder's names (`first_stage_model.encoder.down.0.block.0...`, 1x1 convolutions for
the mid-block attention); CLIP-L keeps transformers' names under `cond_stage_model.transformer.`
(SD1) or `conditioner.embedders.0.transformer.` (SDXL), with CLIP's `text_model` level; SDXL's
second encoder is written as OpenCLIP ViT-bigG (`conditioner.embedders.1.model.`, q/k/v fused
into `in_proj`). The mapping is checked by loading the file with diffusers' own converter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from charaforge.models.lora_files import text_encoder_module_path
from charaforge.models.sgm_names import UnetLayout, sgm_module_path

PREFIXES = {
    "sd15": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    "sdxl": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def unet_state(state: Mapping[str, torch.Tensor], layout: UnetLayout) -> dict[str, torch.Tensor]:
    """UNet parameters by their original names (module path renamed, parameter name kept)."""
    renamed = {}
    for key, tensor in state.items():
        module, _, parameter = key.rpartition(".")
        renamed[f"{sgm_module_path(module, layout)}.{parameter}"] = tensor
    return renamed


def _vae_layer(rest: str, table: Mapping[str, str]) -> str:
    for name, original in table.items():
        if rest.startswith(name + "."):
            return original + rest[len(name) :]
    return rest


def vae_state(state: Mapping[str, torch.Tensor], up_blocks: int) -> dict[str, torch.Tensor]:
    """AutoencoderKL parameters by the LDM autoencoder's names; its decoder numbers up blocks
    from the lowest resolution, as `up.N` counts from the highest (hence the reversal)."""
    renamed = {}
    for key, tensor in state.items():
        if match := _VAE_BLOCK.fullmatch(key):
            coder, blocks, index, rest = match.groups()
            number = int(index) if blocks == "down_blocks" else up_blocks - 1 - int(index)
            level = "down" if blocks == "down_blocks" else "up"
            rest = re.sub(r"^resnets\.(\d+)\.", r"block.\1.", rest)
            rest = re.sub(r"^(down|up)samplers\.0\.", r"\1sample.", rest)
            head, _, tail = rest.partition(".")
            if head == "block":
                number_j, _, layer = tail.partition(".")
                rest = f"block.{number_j}.{_vae_layer(layer, _VAE_RESNET)}"
            renamed[f"{coder}.{level}.{number}.{rest}"] = tensor
        elif match := _VAE_MID.fullmatch(key):
            coder, kind, index, rest = match.groups()
            if kind == "resnets":
                name = f"block_{int(index) + 1}.{_vae_layer(rest, _VAE_RESNET)}"
            else:
                name = f"attn_1.{_vae_layer(rest, _VAE_ATTENTION)}"
                if tensor.ndim == 2:  # the original attention projections are 1x1 convolutions
                    tensor = tensor[:, :, None, None]
            renamed[f"{coder}.mid.{name}"] = tensor
        else:
            coder, _, rest = key.partition(".")
            renamed[f"{coder}.{_vae_layer(rest, _VAE_TOP)}" if rest else key] = tensor
    return renamed


def clip_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L as transformers names it, with the `text_model` level of the original files."""
    return {text_encoder_module_path(key): tensor for key, tensor in state.items()}


def open_clip_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (transformers' CLIPTextModelWithProjection) as OpenCLIP's."""
    renamed: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            renamed["token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            renamed["positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            renamed["ln_final." + key.partition(".")[2]] = tensor
        elif key == "text_projection.weight":
            renamed["text_projection"] = tensor.T.contiguous()  # OpenCLIP multiplies x @ proj
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, module, parameter = match.groups()
            prefix = f"transformer.resblocks.{layer}"
            if projection := re.fullmatch(r"self_attn\.([qkv])_proj", module):
                fused.setdefault((int(layer), parameter), {})[projection.group(1)] = tensor
            else:
                renamed[f"{prefix}.{_OPEN_CLIP_LAYER[module]}.{parameter}"] = tensor
        else:
            raise ValueError(f"text_encoder_2: no OpenCLIP name for {key!r}")
    for (layer, parameter), parts in fused.items():
        joined = torch.cat([parts["q"], parts["k"], parts["v"]])
        renamed[f"transformer.resblocks.{layer}.attn.in_proj_{parameter}"] = joined
    return renamed


def original_state_dict(pipeline: object, family: str) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline's UNet, VAE and text encoders, in the single-file layout."""
    prefixes = PREFIXES[family]
    unet = pipeline.unet  # type: ignore[attr-defined]
    vae = pipeline.vae  # type: ignore[attr-defined]
    parts = {
        "unet": unet_state(unet.state_dict(), UnetLayout.from_config(unet.config)),
        "vae": vae_state(vae.state_dict(), len(vae.config.up_block_types)),
        "text_encoder": clip_state(pipeline.text_encoder.state_dict()),  # type: ignore[attr-defined]
    }
    if family == "sdxl":
        parts["text_encoder_2"] = open_clip_state(pipeline.text_encoder_2.state_dict())  # type: ignore[attr-defined]
    merged = {
        prefixes[component] + key: tensor.detach().to("cpu").contiguous()
        for component, state in parts.items()
        for key, tensor in state.items()
    }
    return {key: merged[key] for key in sorted(merged)}
