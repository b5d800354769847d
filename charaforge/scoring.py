"""CLIP-I and CLIP-T for every image of the evaluation sweep, on open_clip.

CLIP-I of a generated image is the mean cosine between its CLIP image embedding and each reference
image embedding (the dataset's train split); CLIP-T is the cosine between its image embedding and
the embedding of its prompt with the trigger word removed (the trigger is a made-up token the
text encoder never learnt, so leaving it in would only add noise). Both are raw cosines in -1..1,
and scorers.json records model, preprocessing and scale, because the literature reports CLIP
scores on several incompatible scales.

The stand-in is a tiny open_clip CLIP registered at run time and built with random weights under
a fixed seed: every code path (open_clip's tokenizer, its preprocessing, its towers) is the real
one, only the numbers mean nothing, and everything computed with it is labelled as such.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from charaforge.config import ClipConfig, ConfigError, ScoreConfig
from charaforge.io import sha256_file, write_json, write_parquet

log = logging.getLogger(__name__)

METRICS = ("clip_i", "clip_t")
SCALE = "raw cosine, -1..1"
INDEX_COLUMNS = (
    "image_id",
    "image_path",
    "candidate",
    "step",
    "lora_scale",
    "prompt_index",
    "prompt",
    "seed",
)

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
            pixels = torch.stack([self.preprocess(_open_rgb(item)) for item in batch])
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


def _open_rgb(item: Image.Image | str | Path) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as image:
        return image.convert("RGB")


def _normalise(rows: list[torch.Tensor], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float64)
    embeddings = torch.cat(rows).numpy()
    # Normalised in float64 so that an image compared with itself gives 1 to ~1e-15.
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def _register_stand_in() -> None:
    """Make the stand-in architecture known to open_clip's model registry (idempotent)."""
    import open_clip

    if STAND_IN_NAME in open_clip.list_models():
        return
    # open_clip registers architectures from JSON files; the registry keeps what it read, so the
    # file can go right after.
    with tempfile.TemporaryDirectory(prefix="charaforge-clip-") as folder:
        config_file = Path(folder) / f"{STAND_IN_NAME}.json"
        config_file.write_text(json.dumps(STAND_IN_ARCHITECTURE), encoding="utf-8")
        open_clip.add_model_config(config_file)
    if STAND_IN_NAME not in open_clip.list_models():
        raise RuntimeError(f"open_clip did not register the stand-in architecture {STAND_IN_NAME}")


def resolve_weights(path: str) -> Path:
    """A local weights file: as given, else under $AI_CACHE_ROOT. Never downloads."""
    candidates = [Path(path)]
    if not Path(path).is_absolute() and os.environ.get("AI_CACHE_ROOT"):
        candidates.append(Path(os.environ["AI_CACHE_ROOT"]) / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise ConfigError(
        f"score.clip.path: CLIP weights file not found (looked at {looked}); CharaForge never "
        "downloads weights: put the open_clip checkpoint there, or set score.clip.source=stand_in"
    )


def load_clip(config: ClipConfig) -> ClipEmbedder:
    """Build the stand-in (seeded random weights) or load `model_name` from a local file."""
    import open_clip

    if config.source == "stand_in":
        _register_stand_in()
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
        _register_stand_in()  # so a checkpoint of the stand-in architecture loads like any other
        if config.model_name not in open_clip.list_models():
            raise ConfigError(
                f"score.clip.model_name: unknown open_clip architecture {config.model_name!r}"
            )
        weights = resolve_weights(config.path or "")
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


def strip_trigger(prompt: str, trigger: str) -> str:
    """The prompt without the trigger word, and without the empty separators it leaves behind."""
    pattern = re.compile(rf"(?<![\w]){re.escape(trigger)}(?![\w])", flags=re.IGNORECASE)
    parts = []
    for part in prompt.split(","):
        cleaned = " ".join(pattern.sub(" ", part).split())
        if cleaned:
            parts.append(cleaned)
    return ", ".join(parts)


def clip_i_scores(generated: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Mean cosine of each generated embedding with every reference embedding."""
    if len(references) == 0:
        raise ValueError("CLIP-I needs at least one reference image")
    return (generated @ references.T).mean(axis=1)


def clip_t_scores(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Row-wise cosine between image i and text i."""
    return np.einsum("ij,ij->i", images, texts)


def _resolve(root: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


def score_sweep(
    generate_dir: str | Path,
    dataset_dir: str | Path,
    config: ScoreConfig,
    trigger: str,
    out_dir: str | Path,
    root: str | Path = ".",
) -> pd.DataFrame:
    """Score every sweep image; write scores.parquet and scorers.json under `out_dir`.

    Image paths in the tables are relative to the repository root `root` (data-contracts.md).
    """
    root = Path(root)
    index = pd.read_parquet(Path(generate_dir) / "index.parquet")
    missing = [column for column in INDEX_COLUMNS if column not in index.columns]
    if missing:
        raise ValueError(f"{generate_dir}/index.parquet lacks columns {missing}")
    metadata = pd.read_parquet(Path(dataset_dir) / "metadata.parquet")
    references = metadata.loc[metadata["split"] == "train", "image_path"].tolist()
    if not references:
        raise ValueError(f"{dataset_dir}/metadata.parquet has no train-split reference images")

    embedder = load_clip(config.clip)
    log.info(
        "scoring %d images against %d references with %s%s",
        len(index),
        len(references),
        embedder.description["model"],
        " (stand-in)" if embedder.stand_in else "",
    )
    batch = config.batch_size
    reference_embeddings = embedder.embed_images(
        [_resolve(root, path) for path in references], batch
    )
    image_embeddings = embedder.embed_images(
        [_resolve(root, path) for path in index["image_path"]], batch
    )
    scored_prompts = [strip_trigger(prompt, trigger) for prompt in index["prompt"]]
    # Each distinct prompt is encoded once, in sorted order, so the sweep order cannot matter.
    unique_prompts = sorted(set(scored_prompts))
    prompt_embeddings = embedder.embed_texts(unique_prompts, batch)
    row_of_prompt = {prompt: row for row, prompt in enumerate(unique_prompts)}
    text_embeddings = prompt_embeddings[[row_of_prompt[p] for p in scored_prompts]]

    scores = index.loc[:, list(INDEX_COLUMNS)].copy()
    scores["clip_i"] = clip_i_scores(image_embeddings, reference_embeddings)
    scores["clip_t"] = clip_t_scores(image_embeddings, text_embeddings)

    out_dir = Path(out_dir)
    write_parquet(out_dir / "scores.parquet", scores)
    write_json(out_dir / "scorers.json", _scorers_record(embedder, len(references), trigger))
    return scores


def _scorers_record(embedder: ClipEmbedder, n_references: int, trigger: str) -> dict[str, Any]:
    common = {
        **embedder.description,
        "library": "open_clip",
        "scale": SCALE,
        "stand_in": embedder.stand_in,
    }
    return {
        "clip_i": {
            **common,
            "definition": "mean cosine between the image embedding and each reference embedding",
            "references": f"dataset train split ({n_references} images)",
        },
        "clip_t": {
            **common,
            "definition": "cosine between the image embedding and the prompt embedding",
            "prompt": f"trigger word {trigger!r} removed, leftover separators cleaned",
        },
    }
