"""The train checks that need the model, answered from its config files before any weights load.

`check_candidates` needs the UNet's and text encoders' module trees and the VAE's down-sampling;
all of that is in a diffusers folder's `*/config.json`. Built on the meta device (no memory, no
weights read), the same checks answer in about a second instead of after 10-25 s of loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from charaforge.config import TrainConfig
from charaforge.errors import ConfigError
from charaforge.models.base import pipeline_location
from charaforge.train.checks import check_candidates


def _config(folder: Path, part: str) -> dict[str, Any] | None:
    path = folder / part / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.path: {path} is not readable JSON ({error})") from None


def skeleton_pipeline(folder: str | Path) -> Any:
    """The UNet and text encoders of a diffusers folder as empty (meta-device) modules."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    unet_config, vae_config = _config(folder, "unet"), _config(folder, "vae")
    if unet_config is None or vae_config is None:
        raise ConfigError(f"model.path: {folder} has no unet/config.json or vae/config.json")
    encoders = {}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        for part, model_class in (
            ("text_encoder", CLIPTextModel),
            ("text_encoder_2", CLIPTextModelWithProjection),
        ):
            config = _config(folder, part)
            if config is not None:
                encoders[part] = model_class(CLIPTextConfig(**config))
    return SimpleNamespace(
        unet=unet,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        text_encoder=encoders.get("text_encoder"),
        text_encoder_2=encoders.get("text_encoder_2"),
    )


def check_from_configs(folder: str | Path, train: TrainConfig, resolution: int) -> None:
    """Raise ConfigError (naming the key) if `train` cannot train the model in `folder`."""
    check_candidates(skeleton_pipeline(folder), train, resolution)


def check_base(base_dir: str | Path, train: TrainConfig, resolution: int) -> None:
    """The train stage's model checks on the base stage's model (`data/base`), from its config
    files: a bad target, fp16 on CPU or a resolution the UNet cannot take fails here, before the
    stage loads any weights or opens its MLflow run."""
    check_from_configs(pipeline_location(base_dir), train, resolution)
