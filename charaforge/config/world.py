"""The `world` section: pretraining of the world models (model=world)."""

from __future__ import annotations

from pydantic import Field, field_validator

from charaforge.config.base import Strict

# The world stage trains its VAE data-parallel over its two worker processes (models/
# world_parallel): a fixed rank count, so the bytes never depend on the machine.
WORLD_RANKS = 2


class WorldVaeConfig(Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    # SD's VAE weight; at 1e-4 the KL term (summed over the 8x8x4 latent) outweighed the pixel
    # MSE and blurred hair colour (oracle: 34% of reconstructions all-right vs 68% at 1e-6).
    kl_weight: float = Field(default=1e-6, ge=0)

    @field_validator("batch_size")
    @classmethod
    def _splits_over_the_ranks(cls, value: int) -> int:
        if value % WORLD_RANKS:
            raise ValueError(
                f"must be a multiple of {WORLD_RANKS}: the world VAE trains data-parallel "
                f"over the stage's {WORLD_RANKS} worker processes, each on its share"
            )
        return value


class WorldUnetConfig(Strict):
    """The UNet and the text encoder, trained together."""

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    caption_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    # The text encoder's own learning rate (None: learning_rate). Trained as fast as the UNet,
    # the text encoder pulls prompts that differ in a small attribute together before the UNet
    # has learnt to draw it (the world CLIP's text tower did the same; see world_clip).
    text_learning_rate: float | None = Field(default=None, ge=0)
    # Min-SNR-gamma loss weights (as train.min_snr_gamma; None: the plain mean). The world's
    # attributes are decided at the noisy steps, which the plain loss under-weights: with 5.0 the
    # oracle read all six prompted attributes right in 55% of 200 generations against 33% at lr
    # 2e-3 (accessory 0.92 vs 0.69, hair colour 0.73 vs 0.65), 68% against 50% at 3e-3.
    snr_gamma: float | None = Field(default=5.0, gt=0)


class WorldSamplesConfig(Strict):
    """The base model's contact sheet: prompts (rows) x seeds (columns)."""

    prompts: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default=[0, 1, 2, 3], min_length=1)
    steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=4.0, ge=0)
    # Generations of the base model the oracle judges after pretraining (prompts naming all six
    # attributes of seen combinations; steps and guidance as above): world.json's base accuracy.
    eval_images: int = Field(default=200, ge=1)


class WorldClipConfig(Strict):
    """The scorers' open_clip CLIP, trained contrastively on renders and their tag captions."""

    steps: int = Field(default=400, ge=1)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=2e-3, gt=0)  # image tower and logit scale
    # The text tower's own rate. At the image tower's 2e-3 it collapsed the hair and accessory
    # prompts onto one feature (cosine 0.997) before the image tower had learnt those small
    # features, leaving them at chance; at 6e-5 hair colour went 0.23 -> 0.95 zero-shot.
    text_learning_rate: float = Field(default=6e-5, gt=0)
    warmup_steps: int = Field(default=40, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    train_images: int = Field(default=8192, ge=2)  # renders; each step draws fresh caption variants
    eval_images: int = Field(default=600, ge=1)  # held-out renders for the zero-shot accuracies
    # Weight of the zero-shot question term (per-attribute prompt softmax, tag-vs-baseline).
    zero_shot_weight: float = Field(default=1.0, ge=0)


class WorldTaggerConfig(Strict):
    """The WD14-format tagger (a small CNN exported to ONNX), one sigmoid per caption tag."""

    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    train_images: int = Field(default=8192, ge=1)
    eval_images: int = Field(default=600, ge=1)


class WorldOracleConfig(Strict):
    """The attribute oracle (ground truth, never a scorer): one softmax head per attribute."""

    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    train_images: int = Field(default=8192, ge=1)
    eval_images: int = Field(default=600, ge=1)


class WorldConfig(Strict):
    """The `world` stage: renders and the models pretrained on them (used with model=world)."""

    image_size: int = Field(default=32, ge=8)
    corpus_size: int = Field(ge=1)  # renders the diffusion model is pretrained on
    cpu_threads: int = Field(default=1, ge=1)  # torch threads per worker process
    vae: WorldVaeConfig
    unet: WorldUnetConfig
    samples: WorldSamplesConfig
    clip: WorldClipConfig = WorldClipConfig()
    tagger: WorldTaggerConfig = WorldTaggerConfig()
    oracle: WorldOracleConfig = WorldOracleConfig()

    @field_validator("image_size")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (VAE 4x times UNet 2x), got {value}")
        return value
