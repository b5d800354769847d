"""The LoRA targets and the checks that run before any work: a configuration that cannot train
this base model fails with one message naming the key, before a step is taken."""

from __future__ import annotations

from typing import Any

import torch

from charaforge.config import TrainConfig
from charaforge.errors import ConfigError
from charaforge.models.clip_skip import text_layer_count
from charaforge.train.text import text_encoders

# Target presets. UNet names are diffusers' module names; text-encoder names are CLIP's.
UNET_PRESETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    # kohya's LoCon set: attention, feed-forward, the transformer projections, and the convs and
    # time projections of every resnet, down- and up-sampler.
    "all": [
        *("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
        *("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj"),
        *("downsamplers.0.conv", "upsamplers.0.conv"),
    ],
}
TEXT_PRESETS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attention_ff": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def target_modules(train: TrainConfig) -> tuple[list[str], list[str]]:
    """The UNet's and the text encoders' target module names."""
    if isinstance(train.target_modules, str):
        return UNET_PRESETS[train.target_modules], TEXT_PRESETS[train.target_modules]
    return list(train.target_modules), TEXT_PRESETS["attention"]


def _targeted_layers(model: torch.nn.Module, target: str) -> list[tuple[str, torch.nn.Module]]:
    # The same rule peft applies to a list of target names: the full name or its dotted suffix.
    return [
        (name, module)
        for name, module in model.named_modules()
        if (name == target or name.endswith("." + target))
        and isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    ]


def _layer_size(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return min(module.in_features, module.out_features)
    return min(module.in_channels, module.out_channels)


def check_candidates(pipeline: Any, train: TrainConfig, resolution: int | None = None) -> None:
    """Fail before any training if the configuration cannot train this model.

    A target that matches nothing, a rank larger than a targeted layer, a resolution the UNet
    cannot take, fp16 without a GPU, or an optimizer whose package is missing (warm-up longer
    than training is refused by the schema).
    """
    unet_targets, text_targets = target_modules(train)
    models = [("UNet", pipeline.unet, unet_targets, isinstance(train.target_modules, list))]
    if train.text_encoder_lora:
        for encoder in text_encoders(pipeline):
            models.append(("text encoder", encoder, text_targets, False))
    smallest: tuple[int, str] | None = None
    for label, model, targets, explicit in models:
        matched = 0
        for target in targets:
            layers = _targeted_layers(model, target)
            if not layers and explicit:
                raise ConfigError(
                    f"train.target_modules: {target!r} matches no Linear/Conv2d layer of the "
                    f"{label}"
                )
            matched += len(layers)
            for name, module in layers:
                if smallest is None or _layer_size(module) < smallest[0]:
                    smallest = (_layer_size(module), name)
        if not matched:
            raise ConfigError(f"train.target_modules: nothing in the {label} matches {targets}")
    assert smallest is not None
    for candidate in train.candidates:
        if candidate.rank > smallest[0]:
            raise ConfigError(
                f"train.candidates[{candidate.name}].rank: {candidate.rank} is larger than the "
                f"targeted layer {smallest[1]} ({smallest[0]} features): at most {smallest[0]}"
            )
    if resolution is not None:
        multiple = size_multiple(pipeline)
        if resolution % multiple:
            raise ConfigError(
                f"model.resolution: {resolution} is not a multiple of {multiple} (the VAE and "
                "UNet down-sample by that much)"
            )
    layers = min(text_layer_count(encoder) for encoder in text_encoders(pipeline))
    if train.clip_skip > layers:
        raise ConfigError(
            f"train.clip_skip: {train.clip_skip} is more than the text encoder's {layers} layers"
        )
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ConfigError(f"train.optimizer: adamw8bit needs bitsandbytes ({error})") from None


def size_multiple(pipeline: Any) -> int:
    """Image sides must be a multiple of this: the VAE's factor times the UNet's down-sampling."""
    return pipeline.vae_scale_factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
