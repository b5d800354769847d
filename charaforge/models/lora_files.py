"""LoRA files that every tool loads: diffusers' `pytorch_lora_weights.safetensors` and kohya's
layout (read by A1111, ComfyUI and the kohya tools), with the metadata those tools read.

Both are written from the adapter's peft state dicts (one per trained component), so a training
state saved earlier can be exported again without a model. Bytes are deterministic: the JSON
header of every safetensors file is written with sorted keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charaforge.core.layout import kohya_file_name
from charaforge.models.base import pipeline_class
from charaforge.models.sgm_names import (
    TEXT_MODEL_CHILDREN,
    TEXT_MODEL_LEVEL,
    UnetLayout,
    sgm_module_path,
)

# kohya's key prefixes: SD1 has one text encoder (`lora_te_`), SDXL two (`lora_te1_`, `lora_te2_`).
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd15": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
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
    # The UNet's block structure: SDXL kohya files name modules in the original layout.
    unet_layout: UnetLayout | None = None
    # The base's noise-scheduler prediction type (epsilon | v_prediction).
    prediction_type: str = "epsilon"

    @property
    def kohya_stem(self) -> str:
        return kohya_file_name(self.name, self.step).removesuffix(".safetensors")


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


def kohya_module_path(
    family: str, component: str, module: str, unet_layout: UnetLayout | None = None
) -> str:
    """A module's path as kohya names it: SD1 UNet paths are diffusers' (sd-scripts trains SD1
    on a diffusers-shaped UNet), SDXL UNet paths the original checkpoint's (it trains SDXL on
    the original UNet), text-encoder paths CLIP's with the `text_model` level."""
    if component != "unet":
        return text_encoder_module_path(module)
    if family == "sdxl":
        if unet_layout is None:
            raise ValueError("an SDXL kohya file needs the UNet's layout (unet_layout)")
        return sgm_module_path(module, unet_layout)
    return module


# peft's parameter names -> the names A1111, ComfyUI and LyCORIS read (LoRA as kohya, DoRA's
# magnitude as `dora_scale`, LoHa / LoKr as LyCORIS: the same names as peft's).
KOHYA_PARAMETERS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
    **{name: name for name in ("hada_t1", "hada_t2", "lokr_t2")},
    **{name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b")},
    **{name: name for name in ("lokr_w2", "lokr_w2_a", "lokr_w2_b")},
}
# The parameter that gets the module's `.alpha` (one per module; LoKr gets none, see below).
ALPHA_CARRIERS = ("lora_A.weight", "hada_w1_a")


def _split_parameter(key: str) -> tuple[str, str]:
    for parameter in KOHYA_PARAMETERS:
        if key.endswith("." + parameter):
            return key[: -len(parameter) - 1], parameter
    raise ValueError(f"unexpected adapter parameter {key!r}")


def _dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """peft's DoRA magnitude, (out,) for a Linear and (1, out, 1, 1) for a Conv2d, as LyCORIS'
    output-axis `dora_scale`: (out, 1) and (out, 1, 1, 1); ComfyUI reads the axis from it."""
    dims = 2 if magnitude.ndim == 1 else magnitude.ndim
    return magnitude.flatten().reshape(-1, *[1] * (dims - 1))


def kohya_state_dict(
    family: str,
    peft_states: Mapping[str, Mapping[str, torch.Tensor]],
    alpha: float,
    unet_layout: UnetLayout | None = None,
    rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """The adapter in kohya's layout: `<prefix>_<module path, dots as _>.lora_down.weight`,
    `.lora_up.weight` and a scalar `.alpha` per module (DoRA adds `.dora_scale`; LoHa and LoKr
    use LyCORIS' `.hada_w1_a`... and `.lokr_w1`... names).

    The `.alpha` is the trained lora_alpha, so the tools apply the trained scale alpha / rank
    (diffusers' own converter writes alpha = rank, which changes the scale whenever they differ).
    LoKr gets no `.alpha`: the tools scale an undecomposed LoKr by 1 where peft scales it by
    alpha / rank, so that scale is multiplied into `lokr_w1` (needs `rank`) and holds either way.
    Module paths as sd-scripts writes them (`kohya_module_path`): SD1 UNet paths in diffusers'
    naming, SDXL UNet paths in the original checkpoint's (`input_blocks_4_1_...`), text-encoder
    paths with CLIP's `text_model` level (`lora_te_text_model_encoder_layers_0_...`).
    """
    prefixes = KOHYA_PREFIXES[family]
    converted: dict[str, torch.Tensor] = {}
    for component, state in peft_states.items():
        prefix = prefixes[component]
        for key, tensor in state.items():
            module, parameter = _split_parameter(key)
            path = kohya_module_path(family, component, module, unet_layout)
            name = f"{prefix}_{path.replace('.', '_')}"
            if parameter == "lora_magnitude_vector":
                tensor = _dora_scale(tensor)
            elif parameter in ("lokr_w1", "lokr_w1_a"):
                if rank is None:
                    raise ValueError("a LoKr file needs the rank (its scale goes into lokr_w1)")
                tensor = tensor * (alpha / rank)
            if parameter in ALPHA_CARRIERS:
                converted[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
            converted[f"{name}.{KOHYA_PARAMETERS[parameter]}"] = tensor
    return {key: converted[key].contiguous() for key in sorted(converted)}


def safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` as kohya precomputes them for A1111.

    The model hash is SHA-256 of the data after the header (what A1111 computes for a LoRA, the
    first 12 digits its short hash), so it does not depend on the metadata; the legacy hash is
    SHA-256 of the 64 KiB at 1 MiB into the file written with only its `ss_*` keys.
    """
    import safetensors.torch

    training_only = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    contiguous = {key: value.detach().contiguous() for key, value in tensors.items()}
    data = canonical_safetensors(safetensors.torch.save(contiguous, metadata=training_only))
    header_length = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + header_length :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


def kohya_metadata(export: LoraExport, resolution: int) -> dict[str, str]:
    """The header keys A1111 and the kohya tools read (ss_*, modelspec.*), plus provenance.

    `ss_output_name` is the file's stem, so A1111's alias for each checkpoint is its own (with
    one alias for all of a run's checkpoints, A1111 refuses the alias and the names disagree).
    """
    v_prediction = export.prediction_type == "v_prediction"
    metadata = {
        "ss_base_model_version": BASE_MODEL_VERSION[export.family],
        "ss_output_name": export.kohya_stem,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(export.rank),
        "ss_network_alpha": f"{export.alpha:g}",
        "ss_steps": str(export.step),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_v2": "False",
        "ss_v_parameterization": str(v_prediction),
        # Clip skip 1 unless the trainer's metadata (train.clip_skip) says otherwise.
        "ss_clip_skip": "None",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
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
    kohya = kohya_state_dict(
        export.family, peft_states, export.alpha, export.unet_layout, export.rank
    )
    header = kohya_metadata(export, resolution)
    header.update(safetensors_hashes(kohya, header))
    save_safetensors(out_dir / kohya_file_name(export.name, export.step), kohya, header)


def stamp_metadata(source: Path, destination: Path, extra: Mapping[str, str]) -> None:
    """A copy of a safetensors file with metadata keys added (e.g. the MLflow run id on the
    copies logged to MLflow, which the deterministic DVC outputs cannot carry)."""
    from safetensors.torch import load_file, safe_open

    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    save_safetensors(destination, load_file(str(source)), {**metadata, **extra})
