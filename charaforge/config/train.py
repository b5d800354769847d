"""The `train` section: the LoRA candidate grid and every trainer option."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from charaforge.config.base import Strict
from charaforge.core.layout import BASE_CANDIDATE


class CandidateConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    learning_rate: float = Field(ge=0)
    # The text-encoder LoRA's own learning rate (train.text_encoder_lora); None: learning_rate.
    text_encoder_learning_rate: float | None = Field(default=None, ge=0)


class CaptionConfig(Strict):
    """Caption augmentation, as kohya's --shuffle_caption, --keep_tokens, --caption_dropout_rate."""

    shuffle: bool = False
    # The first `keep_tokens` comma-separated tags (the trigger) stay in place when shuffling.
    keep_tokens: int = Field(default=1, ge=0)
    # Probability of training a sample with the empty caption (unconditional), per sample.
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class BucketConfig(Strict):
    """Aspect-ratio buckets: sizes of about resolution**2 pixels, sides a multiple of the UNet's
    down-sampling; each image goes to the bucket nearest its aspect ratio."""

    enabled: bool = False
    max_aspect: float = Field(default=2.0, ge=1.0, le=4.0)


class CacheConfig(Strict):
    """Caches keyed by image content (or caption), model weights and resolution."""

    latents: bool = True
    text_encoder_outputs: bool = True
    dir: str = Field(default="data/cache/train", min_length=1)


class ValidationConfig(Strict):
    # Validation loss every N steps (and at every checkpoint); None: at checkpoints only.
    every: int | None = Field(default=None, ge=1)
    sample_prompts: list[str] = Field(default_factory=list)
    sample_seeds: list[int] = Field(default_factory=lambda: [0])
    sample_steps: int = Field(default=4, ge=1)
    sample_guidance_scale: float = Field(default=5.0, ge=0)


TARGET_PRESETS = ("attention", "attention_ff", "all")


class TrainConfig(Strict):
    batch_size: int = Field(ge=1)
    max_steps: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    # A preset (attention | attention_ff | all: every Linear and Conv2d of the transformer and
    # resnet blocks) or explicit module names, matched as peft matches them.
    target_modules: Literal["attention", "attention_ff", "all"] | list[str]
    candidates: list[CandidateConfig] = Field(min_length=1)
    # torch CPU threads for training (None: torch's default); see models.set_cpu_threads.
    cpu_threads: int | None = Field(default=None, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # The adapter type, through peft: lora; dora (LoRA with weight decomposition, peft's
    # use_dora); loha / lokr (LyCORIS' Hadamard and Kronecker products, peft's LoHa / LoKr).
    adapter: Literal["lora", "dora", "loha", "lokr"] = "lora"
    text_encoder_lora: bool = False
    # A1111's clip skip for the training captions (1 = the text encoder's last layer; anime SD1.5
    # bases train and render at 2). Must equal eval.clip_skip (checked in Params).
    clip_skip: int = Field(default=1, ge=1)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = Field(default=1e-2, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    # Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's value); None: off.
    min_snr_gamma: float | None = Field(default=None, gt=0)
    noise_offset: float = Field(default=0.0, ge=0.0)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    # Continue from the latest saved state of a run with the same configuration and data.
    resume: bool = True
    state_dir: str = Field(default="data/train_state", min_length=1)
    # Processes that share every global batch (`accelerate launch`, DDP): batch_size is the
    # global batch and must divide evenly. The train stage launches them itself when > 1.
    processes: int = Field(default=1, ge=1)
    # CUDA device ids for the processes (None: the first `processes` GPUs, or CPU without one).
    devices: list[int] | None = Field(default=None, min_length=1)
    # The candidate grid: one candidate after another here (local), or one Ray task each (ray
    # section: one GPU per candidate, any node). Same bytes either way.
    executor: Literal["local", "ray"] = "local"

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError(f"give a preset {list(TARGET_PRESETS)} or at least one module name")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> TrainConfig:
        names = [candidate.name for candidate in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be unique, got {names}")
        if BASE_CANDIDATE in names:
            raise ValueError(
                f"candidates: the name {BASE_CANDIDATE!r} is reserved for the base model's row"
            )
        return self

    @model_validator(mode="after")
    def _processes_share_the_batch(self) -> TrainConfig:
        if self.batch_size % self.processes:
            raise ValueError(
                f"batch_size: {self.batch_size} (the global batch) does not split evenly over "
                f"train.processes={self.processes}"
            )
        if self.processes > 1 and self.executor == "ray":
            raise ValueError(
                "executor: ray trains each candidate in one process; use train.processes=1"
            )
        if self.devices is not None:
            if len(set(self.devices)) != len(self.devices) or min(self.devices) < 0:
                raise ValueError(f"devices: {self.devices}: give distinct GPU ids >= 0")
            if len(self.devices) < self.processes:
                raise ValueError(
                    f"devices: {len(self.devices)} device(s) for train.processes={self.processes}"
                )
        return self

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainConfig:
        if self.lr_warmup_steps > self.max_steps:
            raise ValueError(
                f"lr_warmup_steps: {self.lr_warmup_steps} is more than max_steps ({self.max_steps})"
            )
        return self

    @model_validator(mode="after")
    def _cache_needs_fixed_captions(self) -> TrainConfig:
        # Cached text-encoder outputs are per caption: they cannot follow shuffled or dropped
        # captions, nor a text encoder that trains (kohya refuses the same combinations).
        if self.cache.text_encoder_outputs:
            if self.caption.shuffle or self.caption.dropout > 0:
                raise ValueError(
                    "train.cache.text_encoder_outputs cannot be used with caption shuffle or "
                    "dropout (set train.cache.text_encoder_outputs=false)"
                )
            if self.text_encoder_lora:
                raise ValueError(
                    "train.cache.text_encoder_outputs cannot be used with "
                    "train.text_encoder_lora (the text encoder changes)"
                )
        return self
