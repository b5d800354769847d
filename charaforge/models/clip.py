"""The CLIP embedder every scorer and the CLIP zero-shot tagger share, on open_clip.

`load_clip` builds the seeded stand-in (a tiny open_clip CLIP registered at run time, random
weights under a fixed seed: every code path is the real one, only the numbers mean nothing) or
loads an open_clip checkpoint from a local file. Embeddings are L2-normalised float64 rows.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from charaforge.config import ClipConfig
from charaforge.core.files import find_local_file, sha256_file
from charaforge.core.images import open_rgb
from charaforge.errors import ConfigError

STAND_IN_NAME = "charaforge-tiny-clip"
# Same tower classes as ViT-B-32 (ViT image tower, causal text transformer, CLIP BPE vocabulary),
# shrunk so that a few hundred 64 px images embed in seconds on two CPU cores.
STAND_IN_ARCHITECTURE: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
# The world CLIP (charaforge.models.world_clip trains it on the world's renders): the same classes
# again, sized for 32 px renders (patch 4: an 8x8 grid, fine enough for hair and accessories) and
# for tag captions (32 tokens hold the longest world caption twice over; longer prompts are cut).
WORLD_CLIP_NAME = "charaforge-world-clip"
WORLD_CLIP_ARCHITECTURE: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


@dataclass
class ClipEmbedder:
    """An open_clip model with its inference preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    description: dict[str, Any] = field(default_factory=dict)
    stand_in: bool = True

    @torch.inference_mode()
    def embed_images(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 16
    ) -> np.ndarray:
        """L2-normalised image embeddings (float64, one row per image, input order kept)."""
        rows = []
        for batch in _batches(list(images), batch_size, "embedding images"):
            pixels = torch.stack([self.preprocess(open_rgb(item)) for item in batch])
            rows.append(self.model.encode_image(pixels).double())
        return _normalise(rows, self._dim)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """L2-normalised text embeddings (float64, one row per text, input order kept)."""
        rows = []
        for batch in _batches(list(texts), batch_size, "embedding prompts"):
            rows.append(self.model.encode_text(self.tokenizer(list(batch))).double())
        return _normalise(rows, self._dim)

    @property
    def _dim(self) -> int:
        return int(self.model.text_projection.shape[-1])


def _batches(items: list, batch_size: int, what: str) -> Iterator[list]:
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=what, unit="batch", disable=None, leave=False):
        yield items[start : start + batch_size]


def _normalise(rows: list[torch.Tensor], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float64)
    embeddings = torch.cat(rows).numpy()
    # Normalised in float64 so that an image compared with itself gives 1 to ~1e-15.
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def register_architectures() -> None:
    """Make the stand-in and world architectures known to open_clip's registry (idempotent)."""
    import open_clip

    for name, architecture in (
        (STAND_IN_NAME, STAND_IN_ARCHITECTURE),
        (WORLD_CLIP_NAME, WORLD_CLIP_ARCHITECTURE),
    ):
        if name in open_clip.list_models():
            continue
        # open_clip registers architectures from JSON files; the registry keeps what it read, so
        # the file can go right after.
        with tempfile.TemporaryDirectory(prefix="charaforge-clip-") as folder:
            config_file = Path(folder) / f"{name}.json"
            config_file.write_text(json.dumps(architecture), encoding="utf-8")
            open_clip.add_model_config(config_file)
        if name not in open_clip.list_models():
            raise RuntimeError(f"open_clip did not register the architecture {name}")


def load_clip(config: ClipConfig) -> ClipEmbedder:
    """Build the stand-in (seeded random weights) or load `model_name` from a local file."""
    import open_clip

    if config.source == "stand_in":
        register_architectures()
        # fork_rng: seeding must not disturb the caller's global random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.stand_in_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(STAND_IN_NAME)
        tokenizer = open_clip.get_tokenizer(STAND_IN_NAME)
        description = {
            "model": STAND_IN_NAME,
            "architecture": STAND_IN_ARCHITECTURE,
            "weights": f"random, torch.manual_seed({config.stand_in_seed})",
        }
    else:
        register_architectures()  # so checkpoints of our own architectures load like any other
        if config.model_name not in open_clip.list_models():
            raise ConfigError(
                f"score.clip.model_name: unknown open_clip architecture {config.model_name!r}"
            )
        weights = find_local_file(
            config.path or "",
            "score.clip.path",
            "put the open_clip checkpoint there, or set score.clip.source=stand_in",
        )
        # An absolute file path: open_clip then loads that file and never treats it as a tag.
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.model_name, pretrained=str(weights.resolve())
        )
        tokenizer = open_clip.get_tokenizer(config.model_name)
        description = {
            "model": config.model_name,
            "weights": weights.name,
            "weights_sha256": sha256_file(weights),
        }
    model.eval()
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    description["preprocessing"] = {
        "resize": f"{preprocess_cfg['resize_mode']} side to {min(height, width)} px, "
        f"{preprocess_cfg['interpolation']}",
        "crop": f"center {width}x{height}",
        "mean": list(preprocess_cfg["mean"]),
        "std": list(preprocess_cfg["std"]),
        "mode": preprocess_cfg["mode"],
        "transform": repr(preprocess),
    }
    return ClipEmbedder(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        description=description,
        stand_in=config.source == "stand_in",
    )
