"""The score stage's column contracts, in one place (docs/data-contracts.md).

`scores.parquet` is the sweep index's `INDEX_COLUMNS`, then those `OPTIONAL_INDEX_COLUMNS` the
index has, then one float column per metric in `METRIC_COLUMNS` order; `scorers.json` has one
description per metric. Each metric family module (clip, groups, memorisation, face, pose, tags,
context) writes exactly its own tuple below; `charaforge.config.SCORE_METRICS` (what the report
may weigh) is the same set, checked at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from charaforge.config import SCORE_METRICS
from charaforge.core.contracts import SWEEP_CONDITION_COLUMNS, SWEEP_INDEX_COLUMNS

# The sweep index columns every score row carries (written by generate).
INDEX_COLUMNS = SWEEP_INDEX_COLUMNS
# Columns the engine may add (data-contracts.md); carried into scores.parquet when present.
OPTIONAL_INDEX_COLUMNS = SWEEP_CONDITION_COLUMNS

# Metric columns by family, each family in the order it is written.
CLIP_COLUMNS = ("clip_i", "clip_t")
GROUP_COLUMNS = ("diversity", "consistency_clip")
MEMORISATION_COLUMNS = ("nn_similarity", "nn_phash_distance", "memorised")
FACE_COLUMNS = ("face_detected", "arcface", "consistency_arcface")
POSE_COLUMNS = ("pose_oks", "pose_pck_01", "pose_pck_02", "pose_detected")
TAG_COLUMNS = ("tag_precision", "tag_recall")
CONTEXT_COLUMNS = ("context_alignment",)

# The order of the metric columns in scores.parquet (part of its bytes: do not reorder).
METRIC_COLUMNS = (
    *CLIP_COLUMNS,
    *GROUP_COLUMNS,
    *MEMORISATION_COLUMNS,
    *FACE_COLUMNS,
    *POSE_COLUMNS,
    *TAG_COLUMNS,
    *CONTEXT_COLUMNS,
)
METRICS = SCORE_METRICS

if sorted(METRIC_COLUMNS) != sorted(METRICS) or len(set(METRIC_COLUMNS)) != len(METRICS):
    raise ImportError("evaluate.columns.METRIC_COLUMNS and config.SCORE_METRICS disagree")

# The scale of every cosine the scorers report (the literature uses several; say which).
COSINE_SCALE = "raw cosine, -1..1"


def resolve_image_path(root: Path, path: str) -> Path:
    """A table's image path on disk: tables hold paths relative to the repository root."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate


@dataclass
class FamilyScores:
    """What one metric family adds: its per-image columns and their scorers.json descriptions."""

    columns: dict[str, np.ndarray]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
