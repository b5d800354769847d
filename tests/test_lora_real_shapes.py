"""The kohya LoRA files at real model shapes, checked against each tool's own key-matching rule.

SD1.5 and SDXL UNets and text encoders are built from the real configurations on the meta device
(real shapes, no memory), LoRAs are attached by the project's own `attach_lora` with every
target preset and the text encoders on, and the project's exporter writes the files. Each tool's
rule is re-implemented here from its documented behaviour, not from the export code:

- A1111's Lora extension: its model's module table (the original checkpoint names, dots as `_`,
  `diffusion_model_` for the UNet, `transformer_` / `0_transformer_` / `1_model_` for the text
  encoders), its SD1-only renaming of diffusers names (3 resnets per block, up-sampler at `.1`
  only in block 0), the `_[qkv]_proj` fallback onto OpenCLIP's fused attention, and its fallbacks
  for keys already in the original naming (`lora_unet_` -> `diffusion_model_`, `lora_te1_`).
- ComfyUI's key map: `lora_unet_` + every original UNet weight's module, `lora_unet_` + every
  diffusers module (through its diffusers -> original map), and the CLIP keys of its table.
- kohya's `create_network_from_weights`: the names its LoRA network gives the Linear/Conv2d
  layers inside the attention, MLP, resnet and sampler modules of its own models: diffusers'
  UNet for SD1, the original UNet for SDXL, transformers' CLIP (with `text_model`).

The original UNet layout is generated here from the original UNet's construction and confirmed
by diffusers' own single-file converter, which must map it onto exactly the diffusers UNet.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from charaforge.config import TrainConfig
from charaforge.models.lora_files import LoraExport, kohya_file_name, write_lora_files
from charaforge.models.sgm_names import UnetLayout
from charaforge.train.adapters import attach_lora

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
    "attention_head_dim": 8,
}  # fmt: skip
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
CLIP_L = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768,
}  # fmt: skip
CLIP_BIG_G = {
    "hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
    "intermediate_size": 5120, "vocab_size": 49408, "max_position_embeddings": 77,
    "hidden_act": "gelu", "projection_dim": 1280,
}  # fmt: skip
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


# --- the original UNet layout, generated and confirmed by diffusers' converter ---------------


def _original_unet_parameters(config: dict) -> list[str]:
    """The original UNet's parameter names, as its constructor lays the blocks out."""
    blocks = len(config["block_out_channels"])
    depth = config.get("transformer_layers_per_block", 1)
    depth = (depth,) * blocks if isinstance(depth, int) else tuple(depth)
    names = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2"]
    if config.get("addition_embed_type") == "text_time":
        names += ["label_emb.0.0", "label_emb.0.2"]

    def resblock(prefix: str, skip: bool) -> list[str]:
        layers = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
        return [f"{prefix}.{layer}" for layer in layers + ["skip_connection"] * skip]

    def transformer(prefix: str, layers: int) -> list[str]:
        inner = ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"]
        inner += [f"{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")]
        inner += ["attn1.to_out.0", "attn2.to_out.0"]
        found = [f"{prefix}.{p}" for p in ("norm", "proj_in", "proj_out")]
        return found + [
            f"{prefix}.transformer_blocks.{d}.{p}" for d in range(layers) for p in inner
        ]

    channels = config["block_out_channels"]
    per_block = config["layers_per_block"]
    index, ch, stack = 1, channels[0], [channels[0]]
    for level in range(blocks):
        attention = "CrossAttn" in config["down_block_types"][level]
        for _ in range(per_block):
            names += resblock(f"input_blocks.{index}.0", ch != channels[level])
            if attention:
                names += transformer(f"input_blocks.{index}.1", depth[level])
            ch = channels[level]
            stack.append(ch)
            index += 1
        if level < blocks - 1:
            names.append(f"input_blocks.{index}.0.op")
            stack.append(ch)
            index += 1
    names += resblock("middle_block.0", False) + resblock("middle_block.2", False)
    names += transformer("middle_block.1", depth[-1])
    index = 0
    for up, level in enumerate(reversed(range(blocks))):
        attention = "CrossAttn" in config["up_block_types"][up]
        for i in range(per_block + 1):
            skip = ch + stack.pop() != channels[level]
            names += resblock(f"output_blocks.{index}.0", skip)
            slot = 1
            if attention:
                names += transformer(f"output_blocks.{index}.1", depth[level])
                slot = 2
            if level and i == per_block:
                names.append(f"output_blocks.{index}.{slot}.conv")
            ch = channels[level]
            index += 1
    weights_only = ("to_q", "to_k", "to_v")
    parameters = []
    for name in names:
        parameters.append(f"{name}.weight")
        if not name.endswith(weights_only):
            parameters.append(f"{name}.bias")
    return parameters


def _original_to_diffusers(config: dict, unet: torch.nn.Module) -> dict[str, str]:
    """Original UNet module name -> diffusers module name, by diffusers' single-file converter
    (the code that loads original checkpoints), run on the generated parameter names."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    original = _original_unet_parameters(config)
    checkpoint = {LDM_UNET_KEY + name: torch.tensor(float(i)) for i, name in enumerate(original)}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    expected = {name for name, _ in unet.named_parameters()}
    assert set(converted) == expected, sorted(set(converted) ^ expected)[:5]
    mapping = {}
    for diffusers_name, marker in converted.items():
        original_name = original[int(marker)]
        mapping[original_name.rpartition(".")[0]] = diffusers_name.rpartition(".")[0]
    return mapping


# --- the models, the LoRAs and the files -----------------------------------------------------


def _models(family: str) -> SimpleNamespace:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))
        models = SimpleNamespace(unet=unet, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)))
        if family == "sdxl":
            models.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))
    return models


def _export(
    folder: Path, family: str, preset: str, prediction_type: str = "epsilon", adapter: str = "lora"
) -> tuple[Path, SimpleNamespace]:
    """Attach with the project's code, export with the project's code; the LoRA weights get
    seeded random values of their real shapes (the models live on the meta device)."""
    from peft.utils import get_peft_model_state_dict

    models = _models(family)
    train = TrainConfig(
        batch_size=1, max_steps=1, checkpoint_every=1, target_modules=preset,
        text_encoder_lora=True, cache={"text_encoder_outputs": False}, adapter=adapter,
        candidates=[{"name": "c", "rank": 4, "alpha": 2, "learning_rate": 1e-4}],
    )  # fmt: skip
    configs = attach_lora(models, train.candidates[0], train, seed=0)
    generator = torch.Generator().manual_seed(0)
    states = {
        name: {
            key: torch.randn(value.shape, generator=generator)
            for key, value in get_peft_model_state_dict(getattr(models, name)).items()
        }
        for name in configs
    }
    export = LoraExport(
        family=family, name="c", step=1, rank=4, alpha=2.0,
        configs={name: config.to_dict() for name, config in configs.items()},
        unet_layout=UnetLayout.from_config(models.unet.config), prediction_type=prediction_type,
    )  # fmt: skip
    write_lora_files(folder, export, states, resolution=1024 if family == "sdxl" else 512)
    return folder / kohya_file_name("c", 1), models


def _file_modules(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    with safe_open(str(path), "pt") as handle:
        names = handle.keys()
        modules: dict[str, dict[str, tuple[int, ...]]] = {}
        for key in names:
            module, _, suffix = key.partition(".")
            modules.setdefault(module, {})[suffix] = tuple(handle.get_slice(key).get_shape())
    return modules


def _layers(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Module]:
    return {prefix + name: m for name, m in model.named_modules() if isinstance(m, LAYERS)}


def _text_model_layers(config: dict) -> dict[str, torch.nn.Module]:
    """CLIP text tower layers with the `text_model` level, as every tool's CLIP has them
    (CLIPTextModelWithProjection keeps the level in every transformers version)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    return {n: m for n, m in _layers(model).items() if n.startswith("text_model.encoder.")}


def _open_clip_layers() -> dict[str, torch.nn.Module]:
    """OpenCLIP ViT-bigG's text tower (A1111's SDXL second embedder), real config, meta."""
    import open_clip

    config = open_clip.get_model_config("ViT-bigG-14")
    with torch.device("meta"):
        tower = open_clip.model._build_text_tower(config["embed_dim"], config["text_cfg"])
    kinds = (*LAYERS, torch.nn.MultiheadAttention)
    return {n: m for n, m in tower.named_modules() if isinstance(m, kinds)}


# --- each tool's rule ------------------------------------------------------------------------

A1111_RESNET = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
    "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection",
}  # fmt: skip


def _a1111_convert(key: str) -> str:
    """A1111's diffusers -> original renaming (written for SD1: 3 slots per block)."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{_a1111_suffix(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}"
                   f"_{_a1111_suffix(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{_a1111_suffix(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_"
                   f"{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[1]}_"
                   + m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
                   .replace("self_attn", "attn")),
    ]  # fmt: skip
    for pattern, replace in rules:
        if match := re.fullmatch(pattern, key):
            return replace(match)
    return key


def _a1111_suffix(kind: str, suffix: str) -> str:
    return A1111_RESNET.get(suffix, suffix) if kind == "resnets" else suffix


def _a1111_match(key: str, table: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    converted = _a1111_convert(key)
    module = table.get(converted)
    if module is None and (m := re.fullmatch(r"(.*)_([qkv]_proj)$", converted)):
        module = table.get(m[1])  # onto OpenCLIP's fused in-projection
    if module is None and "lora_unet" in key:
        module = table.get(key.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in key:
        module = table.get(key.replace("lora_te1_text_model", "0_transformer_text_model"))
    return module


def _underscored(layers: dict[str, torch.nn.Module], prefix: str) -> dict[str, torch.nn.Module]:
    return {prefix + name.replace(".", "_"): module for name, module in layers.items()}


def _tables(family: str) -> dict[str, dict[str, torch.nn.Module]]:
    """Each tool's LoRA module name -> the real-shaped layer it patches (of fresh models)."""
    config = SD15_UNET if family == "sd15" else SDXL_UNET
    models = _models(family)
    diffusers_layers = _layers(models.unet)
    original = {
        name: diffusers_layers[diffusers]
        for name, diffusers in _original_to_diffusers(config, models.unet).items()
        if diffusers in diffusers_layers
    }
    clip_l = _text_model_layers(CLIP_L)
    # kohya's network wraps the layers inside the UNet's blocks (not conv_in/out, time embedding).
    if family == "sd15":
        pattern, kohya_unet = r"(down_blocks|mid_block|up_blocks)\.", diffusers_layers
    else:
        pattern, kohya_unet = r"(input_blocks\.[1-9]\d*|middle_block|output_blocks)\.", original
    kohya_unet = {name: m for name, m in kohya_unet.items() if re.match(pattern, name)}
    clip_targets = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2")  # fmt: skip
    comfy_clip = {n: m for n, m in clip_l.items() if n.endswith(clip_targets)}
    if family == "sd15":
        a1111 = _underscored(original, "diffusion_model_")
        a1111 |= _underscored(clip_l, "transformer_")
        comfy = _underscored(comfy_clip, "lora_te_")
        kohya = _underscored(clip_l, "lora_te_")
    else:
        big_g = _text_model_layers(CLIP_BIG_G)
        a1111 = _underscored(original, "diffusion_model_")
        a1111 |= _underscored(clip_l, "0_transformer_")
        a1111 |= _underscored(_open_clip_layers(), "1_model_")
        comfy = _underscored(comfy_clip, "lora_te1_")
        big_g_targets = {n: m for n, m in big_g.items() if n.endswith(clip_targets)}
        comfy |= _underscored(big_g_targets, "lora_te2_")
        kohya = _underscored(clip_l, "lora_te1_") | _underscored(big_g, "lora_te2_")
    # ComfyUI: every original weight's module, and every diffusers module through its map.
    comfy |= _underscored(original, "lora_unet_") | _underscored(diffusers_layers, "lora_unet_")
    kohya |= _underscored(kohya_unet, "lora_unet_")
    return {"kohya": kohya, "comfyui": comfy, "a1111": a1111}


PARAMETERS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
}


def _delta_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The weight change's shape as the tools compose it: up @ down (LoRA, DoRA), the Hadamard
    product of w1_a @ w1_b and w2_a @ w2_b (LoHa), the Kronecker product of w1 and w2 (LoKr,
    each factor whole or as _a @ _b). The inner ranks must agree (4)."""
    if "lora_up.weight" in shapes:
        up, down = shapes["lora_up.weight"], shapes["lora_down.weight"]
        assert up[1] == down[0] == 4 and all(size == 1 for size in up[2:])
        return (up[0], *down[1:])
    if "hada_w1_a" in shapes:
        w1a, w1b = shapes["hada_w1_a"], shapes["hada_w1_b"]
        assert (shapes["hada_w2_a"], shapes["hada_w2_b"]) == (w1a, w1b) and w1a[1] == 4
        return (w1a[0], w1b[1])

    def factor(name: str) -> tuple[int, ...]:
        if name in shapes:
            return shapes[name]
        assert shapes[f"{name}_a"][1] == shapes[f"{name}_b"][0] == 4
        return (shapes[f"{name}_a"][0], shapes[f"{name}_b"][1])

    w1, w2 = factor("lokr_w1"), factor("lokr_w2")
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def _fits(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> bool:
    """The weight change has the layer's weight shape (MHA: one of its q/k/v slices); a flat
    change fits a Conv2d with the same element count (the tools reshape it); DoRA's scale is
    one value per output channel (LyCORIS' output axis)."""
    if isinstance(module, torch.nn.MultiheadAttention):
        weight = (module.embed_dim, module.embed_dim)
    else:
        weight = tuple(module.weight.shape)
    delta = _delta_shape(shapes)
    if "dora_scale" in shapes and shapes["dora_scale"] != (weight[0],) + (1,) * (len(weight) - 1):
        return False
    return delta[0] == weight[0] and torch.Size(delta).numel() == torch.Size(weight).numel()


def unmatched_per_tool(
    family: str, modules: dict[str, dict[str, tuple[int, ...]]]
) -> dict[str, list[str]]:
    """Per tool, the file's modules its rule finds no layer for, or a layer whose weight the
    module's change does not fit (the file's modules: name -> parameter suffix -> shape)."""
    result = {}
    for tool, table in _tables(family).items():
        if tool == "a1111":
            found = {name: _a1111_match(name, table) for name in modules}
        else:
            found = {name: table.get(name) for name in modules}
        result[tool] = sorted(
            name for name, module in found.items()
            if module is None or not _fits(module, modules[name])
        )  # fmt: skip
    return result


def _check_every_tool(tmp_path: Path, family: str, preset: str, adapter: str) -> int:
    """Export, then match every module of the file with every tool's rule; the module count."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kohya_file, models = _export(tmp_path, family, preset, adapter=adapter)
    modules = _file_modules(kohya_file)
    peft_modules = sum(
        sum(isinstance(m, BaseTunerLayer) for m in getattr(models, name).modules())
        for name in ("unet", "text_encoder", "text_encoder_2")
        if hasattr(models, name)
    )
    assert len(modules) == peft_modules > 0  # every trained module is in the file, once
    for shapes in modules.values():
        if adapter == "lokr":  # whole or decomposed factors; no alpha (its scale is in w1)
            assert {"lokr_w1", "lokr_w1_a"} & set(shapes) and {"lokr_w2", "lokr_w2_a"} & set(shapes)
            assert set(shapes) <= {f"lokr_w{i}{p}" for i in (1, 2) for p in ("", "_a", "_b")}
        else:
            assert set(shapes) == PARAMETERS[adapter]
            assert shapes["alpha"] == ()
    unmatched = unmatched_per_tool(family, modules)
    counts = ", ".join(f"{tool} {len(names)}" for tool, names in unmatched.items())
    print(f"{family} {preset} {adapter}: {len(modules)} modules; unmatched: {counts}")
    for tool, names in unmatched.items():
        assert names == [], f"{tool}: {len(names)} unmatched or misfit, e.g. {names[:3]}"
    # SDXL files name the UNet in the original layout, as sd-scripts writes them.
    unet = [name for name in modules if name.startswith("lora_unet_")]
    if family == "sdxl":
        assert all(
            re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in unet
        )
        if preset == "all":
            assert "lora_unet_output_blocks_2_2_conv" in modules  # up_blocks.0's up-sampler
    else:
        assert all(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", n) for n in unet)
    return len(modules)


# Modules per file: the UNet's (16 transformer blocks in SD1.5, 70 in SDXL; 8 attention
# layers each, 10 with the feed-forward) plus the text encoders' (12 and 32 layers; 4 or 6).
EXPECTED_MODULES = {
    ("sd15", "attention"): 16 * 8 + 12 * 4,
    ("sd15", "attention_ff"): 16 * 10 + 12 * 6,
    ("sdxl", "attention"): 70 * 8 + 12 * 4 + 32 * 4,
    ("sdxl", "attention_ff"): 70 * 10 + 12 * 6 + 32 * 6,
    # all: + proj_in/out of 16 (11) transformers, 86 (66) resnet convs/time projections/samplers.
    ("sd15", "all"): 16 * 10 + 16 * 2 + 86 + 12 * 6,
    ("sdxl", "all"): 70 * 10 + 11 * 2 + 66 + 12 * 6 + 32 * 6,
}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", ["attention", "attention_ff", "all"])
@pytest.mark.parametrize("adapter", ["lora", "dora", "loha", "lokr"])
def test_every_key_matches_every_tool_at_real_shapes(
    tmp_path: Path, family: str, preset: str, adapter: str
) -> None:
    count = _check_every_tool(tmp_path, family, preset, adapter)
    assert count == EXPECTED_MODULES[family, preset]


def test_kohya_metadata_names_the_checkpoint_and_carries_a1111s_hashes(tmp_path: Path) -> None:
    """ss_output_name is the file's stem; sshs_model_hash / sshs_legacy_hash are what kohya
    precomputes for A1111 (computed here from the file's bytes); v-prediction is recorded."""
    kohya_file, _ = _export(tmp_path, "sd15", "attention", prediction_type="v_prediction")
    data = kohya_file.read_bytes()
    assert len(data) > 0x110000  # big enough for the legacy hash to cover tensor bytes
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__")
    assert metadata["ss_output_name"] == kohya_file.stem == "c-000001"
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2")
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_v_parameterization"] == "True"
    assert metadata["modelspec.prediction_type"] == "v"
    # A1111 hashes a LoRA as SHA-256 of everything after the header; the short hash is 12 digits.
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + length :]).hexdigest()
    # The legacy hash: the same file holding only its ss_* keys, 64 KiB at 1 MiB.
    header["__metadata__"] = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    training_only = len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]
    legacy = hashlib.sha256(training_only[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["sshs_legacy_hash"] == legacy


# --- ControlNet at real shapes ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_and_lora_run_together_at_real_shapes(family: str) -> None:
    """A ControlNet in the real configuration (diffusers' `from_unet` of the real UNet, with the
    (16, 32, 96, 256) conditioning embedding of the SD1.5/SDXL ControlNets; meta device: shapes
    propagate, nothing is computed), LoRAs attached with the `all` preset and the text encoders
    on: a 64 px sampling step runs through text encoder (clip skip 2), ControlNet and UNet, and
    every shape is the real one: 3 conditioning channels at pixel resolution, one residual per
    UNet down-block output, SDXL's 6 time ids and pooled projection (2816 = 1280 + 6 x 256)."""
    from diffusers import ControlNetModel

    models = _models(family)
    train = TrainConfig(
        batch_size=1, max_steps=1, checkpoint_every=1, target_modules="all",
        text_encoder_lora=True, cache={"text_encoder_outputs": False},
        candidates=[{"name": "c", "rank": 4, "alpha": 2, "learning_rate": 1e-4}],
    )  # fmt: skip
    attach_lora(models, train.candidates[0], train, seed=0)
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(
            models.unet, conditioning_embedding_out_channels=(16, 32, 96, 256),
            load_weights_from_unet=False,
        )  # fmt: skip
    assert controlnet.config.conditioning_channels == 3
    assert controlnet.controlnet_cond_embedding.conv_in.in_channels == 3
    batch, latent = 2, 64 // 8
    tokens = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    # clip skip 2: the penultimate of 12 hidden layers (hidden_states has 13 entries).
    hidden = models.text_encoder(tokens, output_hidden_states=True).hidden_states
    assert len(hidden) == 13
    context = hidden[-2]
    extra: dict = {}
    if family == "sdxl":
        second = models.text_encoder_2(tokens, output_hidden_states=True)
        context = torch.cat([context, second.hidden_states[-2]], dim=-1)
        assert second.text_embeds.shape == (batch, 1280)
        time_ids = torch.empty(batch, 6, device="meta")  # size, crop, target size
        extra = {"added_cond_kwargs": {"text_embeds": second.text_embeds, "time_ids": time_ids}}
        assert models.unet.add_embedding.linear_1.in_features == 1280 + 6 * 256
    assert context.shape == (batch, 77, models.unet.config.cross_attention_dim)
    sample = torch.empty(batch, 4, latent, latent, device="meta")
    steps = torch.full((batch,), 10, device="meta")
    down, mid = controlnet(
        sample, steps, encoder_hidden_states=context,
        controlnet_cond=torch.empty(batch, 3, 64, 64, device="meta"), return_dict=False, **extra,
    )  # fmt: skip
    channels = models.unet.config.block_out_channels
    layers = models.unet.config.layers_per_block
    # conv_in, then per down block its resnets and (but the last) its down-sampler.
    expected = [channels[0]]
    for index, width in enumerate(channels):
        expected += [width] * layers + ([width] if index < len(channels) - 1 else [])
    assert [residual.shape[1] for residual in down] == expected
    assert mid.shape[:2] == (batch, channels[-1])
    out = models.unet(
        sample, steps, encoder_hidden_states=context, down_block_additional_residuals=down,
        mid_block_additional_residual=mid, return_dict=False, **extra,
    )[0]  # fmt: skip
    assert out.shape == sample.shape
