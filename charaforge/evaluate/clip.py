"""CLIP-I and CLIP-T for every image of the evaluation sweep, on open_clip.

CLIP-I of a generated image is the mean cosine between its CLIP image embedding and each reference
image embedding (the dataset's train split); CLIP-T is the cosine between its image embedding and
the embedding of its prompt with the trigger word removed (the trigger is a made-up token the
text encoder never learnt, so leaving it in would only add noise). Both are raw cosines in -1..1,
and scorers.json records model, preprocessing and scale, because the literature reports CLIP
scores on several incompatible scales.

The stand-in is a tiny open_clip CLIP registered at run time and built with random weights under
a fixed seed (charaforge.models.clip): every code path (open_clip's tokenizer, its preprocessing,
its towers) is the real one, only the numbers mean nothing, and everything computed with it is
labelled as such. The image embeddings computed here are shared with the group, memorisation and
CLIP zero-shot tag metrics, so each sweep image goes through CLIP once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from charaforge.evaluate.columns import COSINE_SCALE, FamilyScores
from charaforge.models.clip import ClipEmbedder


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


@dataclass(frozen=True)
class SweepEmbeddings:
    """CLIP embeddings of one sweep: its images, the reference images, each row's prompt."""

    images: np.ndarray
    references: np.ndarray
    prompts: np.ndarray


def embed_sweep(
    embedder: ClipEmbedder,
    image_paths: Sequence[Path],
    reference_paths: Sequence[Path],
    prompts: Sequence[str],
    trigger: str,
    batch_size: int,
) -> SweepEmbeddings:
    """Embed references, sweep images and the trigger-stripped prompts (in that order)."""
    references = embedder.embed_images(list(reference_paths), batch_size)
    images = embedder.embed_images(list(image_paths), batch_size)
    scored_prompts = [strip_trigger(prompt, trigger) for prompt in prompts]
    # Each distinct prompt is encoded once, in sorted order, so the sweep order cannot matter.
    unique_prompts = sorted(set(scored_prompts))
    prompt_embeddings = embedder.embed_texts(unique_prompts, batch_size)
    row_of_prompt = {prompt: row for row, prompt in enumerate(unique_prompts)}
    texts = prompt_embeddings[[row_of_prompt[p] for p in scored_prompts]]
    return SweepEmbeddings(images=images, references=references, prompts=texts)


def clip_description(embedder: ClipEmbedder) -> dict[str, Any]:
    """The scorers.json fields every CLIP-based metric shares: model, preprocessing, scale."""
    return {
        **embedder.description,
        "library": "open_clip",
        "scale": COSINE_SCALE,
        "stand_in": embedder.stand_in,
        "applicable": True,
    }


def score_clip(embedder: ClipEmbedder, embeddings: SweepEmbeddings, trigger: str) -> FamilyScores:
    """CLIP-I against the references and CLIP-T against the trigger-stripped prompt."""
    common = clip_description(embedder)
    return FamilyScores(
        columns={
            "clip_i": clip_i_scores(embeddings.images, embeddings.references),
            "clip_t": clip_t_scores(embeddings.images, embeddings.prompts),
        },
        records={
            "clip_i": {
                **common,
                "definition": "mean cosine between the image embedding and each reference "
                "embedding",
                "references": f"dataset train split ({len(embeddings.references)} images)",
            },
            "clip_t": {
                **common,
                "definition": "cosine between the image embedding and the prompt embedding",
                "prompt": f"trigger word {trigger!r} removed, leftover separators cleaned",
            },
        },
    )
