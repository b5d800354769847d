"""Tag consistency: do the generated images carry the tags that define the character?

The defining tags are those carried by at least `score.tags.defining_fraction` of the character's
training images. Each sweep image is tagged by the tagger `score.tags.tagger` names: `clip`, CLIP
zero-shot (charaforge.tagging.clip) over the dataset's own tag vocabulary on the scoring CLIP
(reusing the image embeddings of evaluate.clip), or `pipeline`, the pipeline's `tagger` section
through the tagging backends (not applicable when that is the sidecar reader, which cannot see
pixels). Recall and precision of the defining tags follow per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from charaforge.config import TaggerConfig, TagScoreConfig
from charaforge.core.contracts import defining_tags
from charaforge.evaluate.columns import FamilyScores, resolve_image_path
from charaforge.models.clip import ClipEmbedder
from charaforge.tagging.base import TagRequest, postprocess
from charaforge.tagging.clip import ClipZeroShotTagger
from charaforge.tagging.run import build_tagger


def character_tag_lists(train: pd.DataFrame) -> list[list[str]]:
    """The tags of the character's own training images (real photos in the set are not it)."""
    rows = train
    if "style" in train.columns and (train["style"] != "photo").any():
        rows = train[train["style"] != "photo"]
    return [list(tags) for tags in rows["tags"]]


def prompt_tags(prompt: str) -> set[str]:
    """The comma-separated tags of a prompt, lower-cased."""
    return {part.strip().lower() for part in prompt.split(",") if part.strip()}


def tag_consistency(
    predicted: Sequence[str], defining: set[str], vocabulary: set[str], requested: set[str]
) -> tuple[float, float]:
    """(precision, recall) of the character's defining tags in one image's predicted tags.

    Recall: the share of defining tags the tagger found. Precision: among the predicted tags the
    dataset knows (`vocabulary`), leaving out those the prompt asked for (`requested`, not the
    character's doing), the share that are defining tags; NaN when there is no such tag.
    """
    found = set(predicted)
    recall = len(found & defining) / len(defining) if defining else float("nan")
    judged = (found & vocabulary) - (requested - defining)
    precision = len(judged & defining) / len(judged) if judged else float("nan")
    return precision, recall


def build_score_tagger(
    config: TagScoreConfig,
    tagger_config: TaggerConfig | None,
    embedder: ClipEmbedder,
    train: pd.DataFrame,
    batch_size: int,
) -> Any:
    """The tagger that judges generated images, or None when none can (not applicable).

    `score.tags.tagger: clip`: CLIP zero-shot over the dataset's own tag vocabulary, on the scoring
    CLIP; `pipeline`: the pipeline's `tagger` section, unless it is the sidecar reader.
    """
    if config.tagger == "clip":
        vocabulary = sorted({tag for tags in train["tags"] for tag in tags})
        if not vocabulary:
            return None
        return ClipZeroShotTagger(
            embedder, vocabulary, threshold=config.threshold, batch_size=batch_size
        )
    if tagger_config is None or tagger_config.backend == "sidecar":
        return None
    return build_tagger(tagger_config)


def score_tags(
    index: pd.DataFrame,
    train: pd.DataFrame,
    config: TagScoreConfig,
    tagger_config: TaggerConfig | None,
    embedder: ClipEmbedder,
    image_embeddings: np.ndarray,
    root: Path,
    batch_size: int,
) -> FamilyScores:
    """Defining-tag precision and recall of every sweep image.

    `image_embeddings` are the sweep images' CLIP embeddings from `embedder`: the score stage's
    own CLIP tagger reuses them instead of embedding every image a second time.
    """
    tagger = build_score_tagger(config, tagger_config, embedder, train, batch_size)
    if config.tagger == "clip":
        tagger_config = None  # the pipeline's post-processing belongs to the pipeline's tagger
    defining = set(defining_tags(character_tag_lists(train), config.defining_fraction))
    vocabulary = {tag for tags in train["tags"] for tag in tags}
    precision = np.full(len(index), np.nan)
    recall = np.full(len(index), np.nan)
    if tagger is None:
        reason = "the pipeline's tagger reads sidecar captions and cannot tag generated images"
    elif not defining:
        reason = "no tag is shared by enough training images to define the character"
    else:
        reason = ""
        results = _tag_sweep(index, tagger, config, image_embeddings, root)
        for position, (result, prompt) in enumerate(zip(results, index["prompt"], strict=True)):
            if tagger_config is not None:
                result = postprocess(result, tagger_config)
            precision[position], recall[position] = tag_consistency(
                result.tags, defining, vocabulary, prompt_tags(str(prompt))
            )
    common = {
        "model": getattr(tagger, "name", "none"),
        "stand_in": bool(getattr(tagger, "stand_in", False)),
        "scale": "share of tags, 0..1",
        "defining_tags": sorted(defining),
        "defining_fraction": config.defining_fraction,
        "applicable": not reason,
        "reason": reason,
    }
    return FamilyScores(
        columns={"tag_precision": precision, "tag_recall": recall},
        records={
            "tag_precision": {
                **common,
                "definition": "share of defining tags among the predicted dataset tags the "
                "prompt did not ask for",
            },
            "tag_recall": {**common, "definition": "share of the defining tags the tagger found"},
        },
    )


def _tag_sweep(
    index: pd.DataFrame,
    tagger: Any,
    config: TagScoreConfig,
    image_embeddings: np.ndarray,
    root: Path,
) -> list[Any]:
    """One tagging result per sweep row: from the shared CLIP embeddings for the score stage's own
    CLIP tagger, batched where the backend can (one embedding pass), else image by image."""
    if config.tagger == "clip":
        return [tagger.select(row) for row in tagger.score_embeddings(image_embeddings)]
    requests = [
        TagRequest(str(row.image_id), str(resolve_image_path(root, row.image_path)), None)
        for row in index.itertuples()
    ]
    if hasattr(tagger, "tag_many"):
        return tagger.tag_many(requests)
    return [tagger.tag(request) for request in requests]
