"""Merge a LoRA into the base model at a scale, as users do with the champion after selection:
a single-file checkpoint in the original layout (A1111, ComfyUI, `from_single_file`) and a
diffusers folder (`from_pretrained`), both holding W + scale * delta W.

The LoRA is loaded as the engine loads it (diffusers' loader for LoRA/DoRA, peft for LoHa/LoKr)
and fused by diffusers' `fuse_lora`, which merges peft's own delta of every adapter type, so the
merged model computes what base + LoRA at that scale computes, up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from charaforge.core.files import atomic_path
from charaforge.generate.loras import describe_lora, load_peft_only_adapter, lora_file
from charaforge.models.base import load_base_pipeline, read_base_info
from charaforge.models.checkpoint_layout import original_state_dict
from charaforge.models.loading import WEIGHTS_LOADING_LOCK
from charaforge.models.lora_files import MODELSPEC_ARCHITECTURE, save_safetensors

DIFFUSERS_DIR = "diffusers"
_ADAPTER = "merged"


@dataclass(frozen=True)
class MergeResult:
    checkpoint: Path  # the single file
    diffusers_dir: Path
    tensors: int  # weights in the single file
    changed_modules: int  # weights the LoRA changed

    @property
    def paths(self) -> tuple[Path, Path]:
        return self.checkpoint, self.diffusers_dir


def merge_lora(
    base_dir: str | Path, lora: str | Path, out_dir: str | Path, scale: float = 1.0
) -> MergeResult:
    """Write `out_dir/<lora stem>-merged.safetensors` and `out_dir/diffusers/` (atomically)."""
    file = lora_file(lora)
    info = read_base_info(base_dir)
    pipeline = load_base_pipeline(base_dir, torch.device("cpu"))
    before = {
        key: value.clone() for key, value in original_state_dict(pipeline, info.family).items()
    }
    with WEIGHTS_LOADING_LOCK:
        if not load_peft_only_adapter(pipeline, _ADAPTER, file):
            pipeline.load_lora_weights(str(file), adapter_name=_ADAPTER)
    # fuse_lora scales each adapter's delta by lora_scale on top of its alpha / rank, as
    # set_adapters(weights=scale) does when rendering; unloading keeps the fused weights.
    pipeline.fuse_lora(lora_scale=scale, adapter_names=[_ADAPTER])
    pipeline.unload_lora_weights()
    merged = original_state_dict(pipeline, info.family)
    described = describe_lora(_ADAPTER, file)
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[info.family].removesuffix("/lora"),
        "modelspec.title": f"{described.a1111_name} merged at {scale:g}",
        "charaforge.merged_lora": described.a1111_name,
        "charaforge.merged_lora_hash": described.short_hash,
        "charaforge.merged_lora_scale": f"{scale:g}",
        "charaforge.base": info.display_name,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{described.a1111_name}-merged.safetensors"
    with atomic_path(checkpoint) as temp:
        save_safetensors(temp, merged, metadata)
    with atomic_path(out_dir / DIFFUSERS_DIR) as temp:
        pipeline.save_pretrained(temp, safe_serialization=True)
    changed = sum(not torch.equal(before[key], merged[key]) for key in merged)
    return MergeResult(checkpoint, out_dir / DIFFUSERS_DIR, len(merged), changed)
