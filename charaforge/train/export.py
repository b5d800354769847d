"""A checkpoint's exported LoRA, in both formats (diffusers and kohya), with the kohya `ss_*`
training keys, and its sample images; written into the candidate's output folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charaforge.config import TrainConfig
from charaforge.config.train import CandidateConfig
from charaforge.core.files import atomic_path
from charaforge.core.layout import checkpoint_path
from charaforge.models.base import BaseInfo
from charaforge.models.lora_files import LoraExport, json_ready, write_lora_files
from charaforge.models.sgm_names import UnetLayout
from charaforge.train import resume_state
from charaforge.train.adapters import split_components
from charaforge.train.checks import target_modules
from charaforge.train.data import Item, tag_frequency
from charaforge.train.settings import RunContext


def network_keys(train: TrainConfig) -> dict[str, str]:
    """ss_network_module / ss_network_args: kohya's LoRA, or LyCORIS' module with its `algo`
    (DoRA is LyCORIS' LoRA with `dora_wd`), as the tools that show training settings read them."""
    args: dict[str, Any] = {"target_modules": json_ready(target_modules(train)[0])}
    if train.adapter == "lora":
        return {"ss_network_module": "networks.lora", "ss_network_args": json.dumps(args)}
    args["algo"] = "lora" if train.adapter == "dora" else train.adapter
    if train.adapter == "dora":
        args["dora_wd"] = "True"
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def export_metadata(
    candidate: CandidateConfig,
    train: TrainConfig,
    context: RunContext,
    info: BaseInfo,
    items: list[Item],
    config_digest: str,
    data_digest: str,
) -> dict[str, str]:
    """The kohya ss_* training keys, the trigger, and provenance (no run-dependent values: the
    files are DVC outputs and must be byte-identical across runs)."""
    text_lr = candidate.text_encoder_learning_rate
    text_lr = (candidate.learning_rate if text_lr is None else text_lr) * train.text_encoder_lora
    metadata = {
        "ss_learning_rate": f"{candidate.learning_rate:g}",
        "ss_unet_lr": f"{candidate.learning_rate:g}",
        "ss_text_encoder_lr": f"{text_lr:g}",
        "ss_network_train_unet_only": str(not train.text_encoder_lora),
        "ss_max_train_steps": str(train.max_steps),
        # kohya's clip skip counts as A1111's; it records None for the last layer.
        "ss_clip_skip": "None" if train.clip_skip == 1 else str(train.clip_skip),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit"
        if train.optimizer == "adamw8bit"
        else "torch.optim.AdamW",
        "ss_mixed_precision": train.mixed_precision,
        "ss_min_snr_gamma": "None" if train.min_snr_gamma is None else f"{train.min_snr_gamma:g}",
        "ss_noise_offset": f"{train.noise_offset:g}",
        "ss_network_dropout": f"{train.lora_dropout:g}",
        "ss_shuffle_caption": str(train.caption.shuffle),
        "ss_keep_tokens": str(train.caption.keep_tokens),
        "ss_caption_dropout_rate": f"{train.caption.dropout:g}",
        "ss_enable_bucket": str(train.buckets.enabled),
        "ss_cache_latents": str(train.cache.latents),
        "ss_num_train_images": str(len(items)),
        "ss_tag_frequency": json.dumps(tag_frequency(items), sort_keys=True),
        **network_keys(train),
        "ss_sd_model_name": info.display_name,
        "charaforge.stand_in": str(info.stand_in).lower(),
        "charaforge.git_commit": context.git_commit,
        "charaforge.config_hash": config_digest,
        "charaforge.data_hash": data_digest,
    }
    if context.trigger:
        metadata["modelspec.trigger_phrase"] = context.trigger
    return metadata


@dataclass
class Exporter:
    """Writes a checkpoint's LoRA files (both formats) and its samples into out_dir."""

    candidate: CandidateConfig
    train: TrainConfig
    info: BaseInfo
    context: RunContext
    resolution: int
    out_dir: Path
    state_dir: Path
    lora_configs: dict[str, Any]
    metadata: dict[str, str]  # export_metadata(...): the same for every step
    # The UNet's config (SDXL kohya files use its block structure) and the noise scheduler's
    # prediction type (recorded for the tools).
    unet_config: Mapping[str, Any] | None = None
    prediction_type: str = "epsilon"

    def export(
        self, step: int, peft_states: dict[str, dict[str, torch.Tensor]], samples: Path | None
    ) -> None:
        lora = LoraExport(
            family=self.info.family,
            name=self.candidate.name,
            step=step,
            rank=self.candidate.rank,
            alpha=self.candidate.alpha,
            configs={name: config.to_dict() for name, config in self.lora_configs.items()},
            metadata=self.metadata,
            unet_layout=None
            if self.unet_config is None
            else UnetLayout.from_config(self.unet_config),
            prediction_type=self.prediction_type,
        )
        with atomic_path(self.out_dir / f"checkpoint-{step}") as temp:
            temp.mkdir(parents=True)
            write_lora_files(temp, lora, peft_states, self.resolution)
        # Named by the step, not by `samples`: a re-export from a saved state passes the state's
        # own `samples` folder, which would land in samples/samples/.
        target = self.out_dir / "samples" / f"step-{step:06d}"
        if samples is not None and samples.is_dir() and not target.exists():
            with atomic_path(target) as temp:
                shutil.copytree(samples, temp)

    def rewrite_missing(self, start: int) -> None:
        """A resumed run whose earlier exports were removed (DVC clears outputs) writes them
        again from the saved states."""
        for saved in resume_state.saved_states(self.state_dir):
            if saved.step <= start and not checkpoint_path(self.out_dir, saved.step).is_file():
                flat = resume_state.load_adapter(saved.folder)
                self.export(
                    saved.step, split_components(flat), saved.folder / resume_state.SAMPLES_DIR
                )
