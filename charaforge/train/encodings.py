"""The training set as the loop sees it: planned items (bucket, crop) and their VAE latent
posteriors and text conditioning, through the caches (see caches.py).

Built once per grid: sizes, crops and encodings depend on the base model and the data, not on
the candidate, and the encoders run before any adapter is attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from charaforge.config import TrainConfig, config_hash
from charaforge.train.caches import TensorCache, cache_key, component_fingerprint
from charaforge.train.checks import size_multiple
from charaforge.train.data import Item, data_fingerprint, load_pixels, plan_items
from charaforge.train.text import TEXT_COMPONENTS, encode_captions, text_encoders


@dataclass
class Encoded:
    """An item's cached encodings: latent posterior parameters and (optionally) text."""

    latent_parameters: torch.Tensor
    text: dict[str, torch.Tensor] | None


class CachedEncoder:
    """VAE latent posteriors and text conditioning, through the caches."""

    def __init__(self, pipeline: Any, family: str, location: Path, train: TrainConfig) -> None:
        self.pipeline = pipeline
        self.family = family
        self.clip_skip = train.clip_skip
        cache = train.cache
        self.latent_cache = TensorCache(cache.dir if cache.latents else None, "latents")
        self.text_cache = TensorCache(cache.dir if cache.text_encoder_outputs else None, "text")
        self.vae_fingerprint = component_fingerprint(location / "vae")
        self.text_fingerprint = config_hash(
            {
                name: component_fingerprint(location / name)
                for name in TEXT_COMPONENTS
                if (location / name).is_dir()
            }
        )

    def latent(self, item: Item) -> torch.Tensor:
        """The posterior's parameters (mean and log-variance), not a sample."""
        key = cache_key("latent", item.sha256, self.vae_fingerprint, item.size, item.crop)
        vae = self.pipeline.vae

        def compute() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                pixels = load_pixels(item)[None].to(vae.device, dtype=vae.dtype)
                return {"parameters": vae.encode(pixels).latent_dist.parameters[0].float()}

        return self.latent_cache.get_or_compute(key, compute)["parameters"]

    def text(self, caption: str) -> dict[str, torch.Tensor]:
        # The states depend on the layer taken and on the encoders' dtype (fp16 / bf16 on a GPU
        # with mixed precision), so both are in the key: a change never reads a stale entry.
        dtype = text_encoders(self.pipeline)[0].dtype
        key = cache_key(
            "text", self.family, caption, self.text_fingerprint, self.clip_skip, str(dtype)
        )

        def compute() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return encode_captions(self.pipeline, self.family, [caption], self.clip_skip)

        return self.text_cache.get_or_compute(key, compute)

    def report(self) -> None:
        self.latent_cache.report()
        self.text_cache.report()


@dataclass
class TrainingData:
    """The planned train and val items and their (cached) encodings.

    Train items are encoded up front only for what is cached; validation always goes through
    the caches' functions (never augmented captions).
    """

    items: list[Item]
    val_items: list[Item]
    encoded: list[Encoded]
    val_encoded: list[Encoded]
    encoder: CachedEncoder

    @classmethod
    def build(
        cls,
        base: Any,  # a FrozenBase
        rows: pd.DataFrame,
        val_rows: pd.DataFrame,
        train: TrainConfig,
        resolution: int,
    ) -> TrainingData:
        multiple = size_multiple(base.pipeline)
        items = plan_items(rows, resolution, train, multiple)
        val_items = plan_items(val_rows, resolution, train, multiple) if len(val_rows) else []
        encoder = CachedEncoder(base.pipeline, base.family, base.location, train)
        encoded = [
            Encoded(
                encoder.latent(item) if train.cache.latents else torch.empty(0),
                encoder.text(item.caption) if train.cache.text_encoder_outputs else None,
            )
            for item in items
        ]
        val_encoded = [
            Encoded(encoder.latent(item), encoder.text(item.caption)) for item in val_items
        ]
        encoder.report()
        return cls(items, val_items, encoded, val_encoded, encoder)

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.items, self.val_items)

    def latent_parameters(self, batch: list[int]) -> torch.Tensor:
        """The batch's stacked posterior parameters (cached, or encoded now)."""
        return torch.stack(
            [
                self.encoded[i].latent_parameters
                if self.encoded[i].latent_parameters.numel()
                else self.encoder.latent(self.items[i])
                for i in batch
            ]
        )

    def cached_text(self, batch: list[int]) -> dict[str, torch.Tensor]:
        return {
            key: torch.cat([self.encoded[i].text[key] for i in batch])
            for key in self.encoded[batch[0]].text
        }
