"""Memorisation: does a generated image copy a training image?

Two nearest-neighbour measures against the dataset's train split: the highest CLIP cosine with
any training image, and the smallest Hamming distance between 64-bit DCT perceptual hashes
(imagehash.phash). An image is flagged as memorised when its pHash is within
`score.memorisation.phash_distance` of a training image's, or, with a real CLIP, when its cosine
with one reaches `score.memorisation.copy_threshold`; a stand-in CLIP's cosines mean nothing, so
then only the pHash copy guard decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from charaforge.config import MemorisationConfig
from charaforge.core.images import open_rgb
from charaforge.evaluate.clip import SweepEmbeddings, clip_description
from charaforge.evaluate.columns import FamilyScores
from charaforge.models.clip import ClipEmbedder


def nearest_neighbour_similarity(generated: np.ndarray, training: np.ndarray) -> np.ndarray:
    """Per generated image, the highest cosine with any training image (memorisation)."""
    if len(training) == 0:
        raise ValueError("memorisation needs at least one training image")
    return (generated @ training.T).max(axis=1)


def phash_bits(images: Sequence[Image.Image | str | Path]) -> np.ndarray:
    """64-bit DCT perceptual hashes (imagehash.phash) as an (n, 64) bool array."""
    import imagehash  # imported lazily: only the score stage needs it

    return np.array(
        [imagehash.phash(open_rgb(image)).hash.ravel() for image in images], dtype=bool
    ).reshape(len(images), 64)


def nearest_hamming(generated: np.ndarray, training: np.ndarray) -> np.ndarray:
    """Per generated hash, the smallest Hamming distance to any training hash."""
    if len(training) == 0:
        raise ValueError("memorisation needs at least one training image")
    return (generated[:, None, :] != training[None, :, :]).sum(axis=2).min(axis=1)


def score_memorisation(
    embedder: ClipEmbedder,
    embeddings: SweepEmbeddings,
    image_paths: Sequence[Path],
    reference_paths: Sequence[Path],
    config: MemorisationConfig,
) -> FamilyScores:
    """CLIP nearest-neighbour similarity, pHash nearest distance and the memorised flag."""
    similarity = nearest_neighbour_similarity(embeddings.images, embeddings.references)
    distance = nearest_hamming(phash_bits(image_paths), phash_bits(reference_paths))
    memorised = distance <= config.phash_distance
    if not embedder.stand_in:
        memorised |= similarity >= config.copy_threshold
    criterion = (
        f"its pHash is within Hamming distance {config.phash_distance} of a training image's"
    )
    if embedder.stand_in:
        criterion += " (the stand-in CLIP is not used for this)"
    else:
        criterion += f" or its CLIP cosine with one is at least {config.copy_threshold:g}"
    return FamilyScores(
        columns={
            "nn_similarity": similarity,
            "nn_phash_distance": distance.astype(np.float64),
            "memorised": memorised.astype(np.float64),
        },
        records={
            "nn_similarity": {
                **clip_description(embedder),
                "definition": "highest CLIP cosine with any training image (memorisation)",
                "copy_threshold": config.copy_threshold,
            },
            "nn_phash_distance": {
                "model": "imagehash.phash (64-bit DCT hash, no weights)",
                "stand_in": False,
                "applicable": True,
                "scale": "Hamming distance, 0..64",
                "definition": "smallest pHash Hamming distance to any training image",
            },
            "memorised": {
                "model": "pHash"
                + ("" if embedder.stand_in else f" + {embedder.description['model']}"),
                "stand_in": False,
                "applicable": True,
                "scale": "share of images, 0..1",
                "definition": "1 when the image copies a training image, else 0",
                "criterion": criterion,
            },
        },
    )
