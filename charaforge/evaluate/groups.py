"""Sweep groups and the metrics measured within them: diversity and CharaConsist consistency.

A group is the set of images one candidate, checkpoint and LoRA scale drew for one prompt group:
the suite group when the sweep has prompt suites (engine columns `suite`, `prompt_group`,
`identity_shot`), else one prompt across its seeds. Diversity is the spread inside a group (an
identity score rewards copy-paste, the spread keeps it honest); consistency is how close each
image is to the group's identity shot (computed on CLIP here, on ArcFace in evaluate.face).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from charaforge.evaluate.clip import clip_description
from charaforge.evaluate.columns import FamilyScores
from charaforge.models.clip import ClipEmbedder


def prompt_groups(index: pd.DataFrame) -> list[str]:
    """Each row's prompt group: its suite group (`suite`, `prompt_group`) when the engine gave
    one, else its own prompt (the images of one prompt across seeds)."""
    groups = [f"prompt {int(number)}" for number in index["prompt_index"]]
    if "prompt_group" in index.columns:
        suites = index["suite"] if "suite" in index.columns else pd.Series("", index=index.index)
        for position, (suite, group) in enumerate(zip(suites, index["prompt_group"], strict=True)):
            if not pd.isna(group):
                groups[position] = f"suite {'' if pd.isna(suite) else suite} group {int(group)}"
    return groups


def suite_groups(index: pd.DataFrame) -> tuple[list[str | None], list[bool]]:
    """Per row, its (candidate, step, scale, suite group, method) key or None, and whether it
    is the group's identity shot (engine columns `suite`, `prompt_group`, `identity_shot`,
    `method`: each method of a suite's method axis is a group of its own)."""
    if "prompt_group" not in index.columns or "identity_shot" not in index.columns:
        return [None] * len(index), [False] * len(index)
    suites = index["suite"] if "suite" in index.columns else pd.Series("", index=index.index)
    methods = index["method"] if "method" in index.columns else pd.Series("", index=index.index)
    keys: list[str | None] = []
    for candidate, step, scale, suite, group, method in zip(
        index["candidate"], index["step"], index["lora_scale"], suites, index["prompt_group"],
        methods, strict=True,
    ):  # fmt: skip
        if pd.isna(group):
            keys.append(None)
        else:
            method = "" if pd.isna(method) or not method else f"|{method}"
            keys.append(f"{candidate}|{int(step)}|{float(scale):g}|{suite}|{int(group)}{method}")
    anchors = [bool(value) if not pd.isna(value) else False for value in index["identity_shot"]]
    return keys, anchors


def group_diversity(embeddings: np.ndarray, groups: Sequence[object]) -> np.ndarray:
    """Per image, the mean cosine distance (1 - cos) to the other images of its group.

    NaN for an image alone in its group: spread is undefined for one sample.
    """
    result = np.full(len(embeddings), np.nan)
    labels = pd.Series(list(groups))
    for _, members in labels.groupby(labels, sort=False).groups.items():
        rows = np.asarray(members)
        if len(rows) < 2:
            continue
        similarity = embeddings[rows] @ embeddings[rows].T
        distance = (1.0 - similarity).sum(axis=1) / (len(rows) - 1)  # the diagonal adds 1 - 1 = 0
        result[rows] = distance
    return result


def group_consistency(
    embeddings: np.ndarray, groups: Sequence[object | None], anchors: Sequence[bool]
) -> np.ndarray:
    """Per image, cosine with the normalised mean embedding of its group's identity shots.

    The CharaConsist reading of a prompt group: the first prompt of a group is the identity
    shot and the rest should show the same character. NaN for the identity shots themselves,
    for rows outside any group (None), for rows without an embedding (NaN) and for groups with
    no usable identity shot.
    """
    result = np.full(len(embeddings), np.nan)
    labels = pd.Series([None if g is None else str(g) for g in groups], dtype=object)
    anchors = np.asarray(anchors, dtype=bool)
    usable = ~np.isnan(embeddings).any(axis=1)
    for _, members in labels.dropna().groupby(labels.dropna(), sort=False).groups.items():
        rows = np.asarray(members)
        shots = rows[anchors[rows] & usable[rows]]
        if len(shots) == 0:
            continue
        anchor = embeddings[shots].mean(axis=0)
        anchor = anchor / np.linalg.norm(anchor)
        others = rows[~anchors[rows] & usable[rows]]
        result[others] = embeddings[others] @ anchor
    return result


def score_groups(
    index: pd.DataFrame, embedder: ClipEmbedder, image_embeddings: np.ndarray
) -> FamilyScores:
    """CLIP diversity within each prompt group and CLIP consistency within each suite group
    (`image_embeddings`: the sweep images' embeddings from `embedder`)."""
    clip_common = clip_description(embedder)
    groups = list(
        zip(
            index["candidate"],
            index["step"],
            index["lora_scale"],
            prompt_groups(index),
            strict=True,
        )
    )
    suite_keys, anchors = suite_groups(index)
    consistency = group_consistency(image_embeddings, suite_keys, anchors)
    has_suites = bool((~np.isnan(consistency)).any())
    return FamilyScores(
        columns={
            "diversity": group_diversity(image_embeddings, groups),
            "consistency_clip": consistency,
        },
        records={
            "diversity": {
                **clip_common,
                "scale": "mean cosine distance (1 - cos), 0..2",
                "definition": "mean CLIP cosine distance to the other images of the same "
                "candidate, step, LoRA scale and prompt group (the suite group when the sweep "
                "has one, else the prompt); NaN when alone",
            },
            "consistency_clip": {
                **clip_common,
                "definition": "CLIP cosine with the mean embedding of the identity shots of the "
                "same candidate, step, scale and suite group (CharaConsist); NaN outside suite "
                "groups",
                "applicable": has_suites,
                "reason": "" if has_suites else "the sweep has no prompt suite groups",
            },
        },
    )
