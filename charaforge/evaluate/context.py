"""Context alignment: does the image still show what the prompt asks for beside the character?

CLIP-T compares an image with the whole prompt, so a LoRA that draws the character perfectly but
ignores "beach background" loses little of it: the character's tags dominate the prompt. Here
each prompt is split into the trigger, the character's defining tags (those carried by at least
`score.tags.defining_fraction` of the training images, as for tag consistency) and the rest, the
context ("beach background", "sitting", "outdoors"). Each context tag is asked of the image as a
CLIP zero-shot question, "a picture of {tag}" against the neutral "a picture" at the model's own
temperature (the CLIP zero-shot tagger's decision), and the image's score is the mean
probability over its prompt's context tags: 1 when CLIP sees every asked-for context, 0 when it
sees none. A prompt with no context tag scores NaN (nothing to follow).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from charaforge.core.contracts import defining_tags
from charaforge.evaluate.columns import CONTEXT_COLUMNS, FamilyScores
from charaforge.evaluate.tags import character_tag_lists, prompt_tags
from charaforge.models.clip import ClipEmbedder
from charaforge.tagging.clip import ClipZeroShotTagger


def context_tags(prompt: str, trigger: str, defining: set[str]) -> list[str]:
    """The prompt's tags that are neither the trigger nor the character's defining tags."""
    return sorted(prompt_tags(prompt) - defining - {trigger.strip().lower()})


def score_context(
    index: pd.DataFrame,
    train: pd.DataFrame,
    defining_fraction: float,
    embedder: ClipEmbedder,
    image_embeddings: np.ndarray,
    trigger: str,
    batch_size: int,
) -> FamilyScores:
    """Per sweep image, the mean CLIP zero-shot probability of its prompt's context tags."""
    defining = set(defining_tags(character_tag_lists(train), defining_fraction))
    per_row = [context_tags(str(prompt), trigger, defining) for prompt in index["prompt"]]
    vocabulary = sorted({tag for tags in per_row for tag in tags})
    values = np.full(len(index), np.nan)
    if vocabulary:
        tagger = ClipZeroShotTagger(embedder, vocabulary, batch_size=batch_size)
        probabilities = tagger.score_embeddings(image_embeddings)
        column = {tag: position for position, tag in enumerate(tagger.vocabulary)}
        for row, tags in enumerate(per_row):
            if tags:
                values[row] = float(np.mean([probabilities[row, column[tag]] for tag in tags]))
    reason = "" if vocabulary else "no prompt asks for anything beside the character"
    record = {
        "model": embedder.description.get("model", "clip"),
        "stand_in": bool(embedder.stand_in),
        "scale": "probability, 0..1",
        "definition": "mean CLIP zero-shot probability ('a picture of {tag}' against 'a "
        "picture') of the prompt's tags that are neither the trigger nor the character's "
        "defining tags",
        "context_tags": vocabulary,
        "defining_fraction": defining_fraction,
        "applicable": not reason,
        "reason": reason,
    }
    (name,) = CONTEXT_COLUMNS
    return FamilyScores(columns={name: values}, records={name: record})
