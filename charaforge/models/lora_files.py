"""LoRA files that every tool loads: diffusers' `pytorch_lora_weights.safetensors` and kohya's
layout (read by A1111, ComfyUI and the kohya tools), with the metadata those tools read.

Both are written from the adapter's peft state dicts (one per trained component), so a training
state saved earlier can be exported again without a model. Bytes are deterministic: the JSON
header of every safetensors file is written with sorted keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charaforge.models.base import pipeline_class

# kohya's key prefixes: SD1 has one text encoder (`lora_te_`), SDXL two (`lora_te1_`, `lora_te2_`).
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd15": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
# CLIP's text tower lives under `text_model` in the original checkpoints and in every tool's
# key rules (`cond_stage_model.transformer.text_model.encoder...`); transformers 5 flattened
# CLIPTextModel (its modules start at `encoder.`) but not CLIPTextModelWithProjection.
TEXT_MODEL_LEVEL = "text_model"
TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")
# What A1111 (ss_base_model_version) and modelspec call each family.
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {
    "sd15": "stable-diffusion-v1/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


@dataclass(frozen=True)
class LoraExport:
    """Everything the two files say about one adapter besides its weights."""

    family: str
    name: str
    step: int
    rank: int
    alpha: float
    # Per component, the adapter's LoraConfig as a dict (diffusers restores alpha from it).
    configs: Mapping[str, Mapping[str, Any]]
    # ss_* / modelspec.* / charaforge.* keys beyond the ones derived here.
    metadata: Mapping[str, str] = field(default_factory=dict)


def kohya_file_name(candidate: str, step: int) -> str:
    return f"{candidate}-{step:06d}.safetensors"


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted.

    safetensors writes the `__metadata__` map in hash order, which changes from one process to
    the next; sorting the header keeps the bytes (and DVC hashes) stable. Tensor offsets are
    relative to the data section, so the data bytes stay as they are.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


def save_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> None:
    import safetensors.torch

    contiguous = {key: value.detach().contiguous() for key, value in tensors.items()}
    data = safetensors.torch.save(contiguous, metadata=dict(metadata or {}))
    Path(path).write_bytes(canonical_safetensors(data))


def json_ready(value: Any) -> Any:
    # Sets (peft stores target_modules as one) would serialise in hash order: sort them.
    if isinstance(value, set | frozenset):
        return sorted(json_ready(item) for item in value)
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def text_encoder_module_path(module: str) -> str:
    """A text-encoder module path in the layout of the original checkpoints, whatever the
    installed transformers: `encoder.layers.0...` becomes `text_model.encoder.layers.0...`;
    paths that already have the level (and `text_projection`, which sits beside it) stay."""
    if module.partition(".")[0] in TEXT_MODEL_CHILDREN:
        return f"{TEXT_MODEL_LEVEL}.{module}"
    return module


def standard_layout(component: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A component's peft state with text-encoder keys in the standard layout (UNet unchanged)."""
    if component == "unet":
        return dict(state)
    return {text_encoder_module_path(key): tensor for key, tensor in state.items()}


# --- kohya ---------------------------------------------------------------------------------------


def kohya_state_dict(
    family: str, peft_states: Mapping[str, Mapping[str, torch.Tensor]], alpha: float
) -> dict[str, torch.Tensor]:
    """The adapter in kohya's layout: `<prefix>_<module path, dots as _>.lora_down.weight`,
    `.lora_up.weight` and a scalar `.alpha` per module.

    The `.alpha` is the trained lora_alpha, so the tools apply the trained scale alpha / rank
    (diffusers' own converter writes alpha = rank, which changes the scale whenever they differ).
    UNet module paths are diffusers' names, as kohya writes them for SD1; A1111 and ComfyUI map
    them to their own for SD1 and SDXL alike. Text-encoder paths keep CLIP's `text_model` level
    (`lora_te_text_model_encoder_layers_0_...`), the only form the tools match.
    """
    prefixes = KOHYA_PREFIXES[family]
    converted: dict[str, torch.Tensor] = {}
    for component, state in peft_states.items():
        prefix = prefixes[component]
        for key, tensor in standard_layout(component, state).items():
            module, _, kind = key.rpartition(".lora_")
            name = f"{prefix}_{module.replace('.', '_')}"
            if kind == "A.weight":
                converted[f"{name}.lora_down.weight"] = tensor
                converted[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
            elif kind == "B.weight":
                converted[f"{name}.lora_up.weight"] = tensor
            else:
                raise ValueError(f"unexpected LoRA parameter {key!r} (only lora_A/lora_B)")
    return {key: converted[key].contiguous() for key in sorted(converted)}


def kohya_metadata(export: LoraExport, resolution: int) -> dict[str, str]:
    """The header keys A1111 and the kohya tools read (ss_*, modelspec.*), plus provenance."""
    metadata = {
        "ss_base_model_version": BASE_MODEL_VERSION[export.family],
        "ss_output_name": export.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(export.rank),
        "ss_network_alpha": f"{export.alpha:g}",
        "ss_steps": str(export.step),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[export.family],
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"{export.name}-{export.step}",
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    metadata.update(export.metadata)
    return metadata


# --- diffusers -----------------------------------------------------------------------------------


def diffusers_metadata(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """What diffusers' own writer stores: each component's LoraConfig under `<component>.`."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    packed = {
        f"{component}.{key}": value
        for component, config in configs.items()
        for key, value in json_ready(dict(config)).items()
    }
    return {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def write_lora_files(
    out_dir: Path,
    export: LoraExport,
    peft_states: Mapping[str, Mapping[str, torch.Tensor]],
    resolution: int,
) -> None:
    """Write both files into out_dir (an existing, temporary folder the caller renames).

    The diffusers file goes through the pipeline's own `save_lora_weights`; only the writer is
    ours, to get deterministic bytes. Keys stay in peft's naming (`lora_A`/`lora_B`), which
    diffusers loads natively: its legacy converter renames attention layers only, and a file
    that mixes the two namings (attention plus convolutions) does not load back completely.
    Text-encoder keys get the `text_model` level as diffusers' own trainers write them
    (`text_encoder.text_model.encoder...`); its loader drops the level for a flattened model.
    """

    metadata = diffusers_metadata(export.configs)

    def save_function(weights: dict[str, torch.Tensor], filename: str) -> None:
        save_safetensors(filename, weights, metadata)

    layers = {
        f"{component}_lora_layers": standard_layout(component, state)
        for component, state in peft_states.items()
    }
    pipeline_class(export.family).save_lora_weights(out_dir, save_function=save_function, **layers)
    save_safetensors(
        out_dir / kohya_file_name(export.name, export.step),
        kohya_state_dict(export.family, peft_states, export.alpha),
        kohya_metadata(export, resolution),
    )


def stamp_metadata(source: Path, destination: Path, extra: Mapping[str, str]) -> None:
    """A copy of a safetensors file with metadata keys added (e.g. the MLflow run id on the
    copies logged to MLflow, which the deterministic DVC outputs cannot carry)."""
    from safetensors.torch import load_file, safe_open

    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    save_safetensors(destination, load_file(str(source)), {**metadata, **extra})
