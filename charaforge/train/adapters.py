"""The LoRA adapters, through peft: attach (seeded init), read and write their weights, and
remove them so that the frozen base is pristine for the next candidate."""

from __future__ import annotations

from typing import Any

import torch

from charaforge.config import TrainConfig
from charaforge.config.train import CandidateConfig
from charaforge.core.files import derive_seed
from charaforge.train.checks import target_modules
from charaforge.train.text import TEXT_COMPONENTS, text_encoders

ADAPTER_NAME = "default"  # peft's name for a model's only adapter


def attach_lora(
    pipeline: Any, candidate: CandidateConfig, train: TrainConfig, seed: int
) -> dict[str, Any]:
    """Add the peft adapters of type train.adapter (UNet, and the text encoders when asked).

    Their init draws from a seeded private RNG. Returns each component's peft config.
    """
    unet_targets, text_targets = target_modules(train)
    components = {"unet": (pipeline.unet, unet_targets)}
    if train.text_encoder_lora:
        for name, encoder in zip(TEXT_COMPONENTS, text_encoders(pipeline), strict=False):
            components[name] = (encoder, text_targets)
    configs = {}
    for name, (model, targets) in components.items():
        config = adapter_config(train.adapter, candidate, train.lora_dropout, list(targets))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, candidate.name, "lora_init", name))
            model.add_adapter(config)
        configs[name] = config
    return configs


def adapter_config(
    kind: str, candidate: CandidateConfig, dropout: float, targets: list[str]
) -> Any:
    """peft's config for one adapter type (train.adapter), at the candidate's rank and alpha.

    LoRA and DoRA start with a gaussian A and a zero B; LoHa and LoKr with peft's default init,
    in which one factor is zero, so every adapter starts as the identity. LoHa and LoKr take the
    dropout as LyCORIS' rank dropout.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind in ("lora", "dora"):
        return LoraConfig(
            r=candidate.rank,
            lora_alpha=candidate.alpha,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            use_dora=kind == "dora",
            target_modules=targets,
        )
    config_class = {"loha": LoHaConfig, "lokr": LoKrConfig}[kind]
    return config_class(
        r=candidate.rank, alpha=candidate.alpha, rank_dropout=dropout, target_modules=targets
    )


def remove_lora(pipeline: Any, components: list[str]) -> None:
    """Take the adapters out again: every wrapped layer becomes its base layer, as loaded."""
    from diffusers.utils import recurse_remove_peft_layers

    for name in components:
        model = getattr(pipeline, name)
        if name == "unet":
            model.unload_lora()  # diffusers: base layers back, peft config dropped
        else:
            # transformers: drop the adapter (and its config), then the empty peft wrappers.
            model.delete_adapter(ADAPTER_NAME)
            recurse_remove_peft_layers(model)


def adapter_state(pipeline: Any, components: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each trained component's LoRA weights, with peft's keys (no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: {
            key: value.detach().cpu()
            for key, value in get_peft_model_state_dict(getattr(pipeline, name)).items()
        }
        for name in components
    }


def split_components(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`<component>.<peft key>` tensors, per component."""
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        component, _, peft_key = key.partition(".")
        split.setdefault(component, {})[peft_key] = value
    return split


def load_adapter_state(pipeline: Any, flat: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA weights (`<component>.<peft key>`) into the live adapters, exactly."""
    from peft import set_peft_model_state_dict

    for component, state in split_components(flat).items():
        result = set_peft_model_state_dict(getattr(pipeline, component), state, ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{component}: saved LoRA keys the model lacks, e.g. "
                             f"{result.unexpected_keys[0]}")  # fmt: skip


def build_optimizer(parameters: list[dict[str, Any]], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (8-bit state for tensors of 4,096 elements or more)."""
    if train.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, weight_decay=train.weight_decay)
    # Fused: one elementwise kernel per tensor (the same bits on 1 or N processes). On CPU torch
    # otherwise takes its per-tensor Python loop, which was 10% of a world LoRA step (py-spy).
    return torch.optim.AdamW(parameters, weight_decay=train.weight_decay, fused=True)
