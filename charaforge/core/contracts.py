"""Readers of the tables stages hand to each other (docs/data-contracts.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pandas as pd

# The sweep index (generate/index.parquet): these columns always, in this order ...
SWEEP_INDEX_COLUMNS = (
    "image_id",
    "image_path",
    "candidate",
    "step",
    "lora_scale",
    "prompt_index",
    "prompt",
    "seed",
)
# ... then these, which say how an image was conditioned (empty when it was not).
SWEEP_CONDITION_COLUMNS = (
    "suite",
    "prompt_group",
    "identity_shot",
    "pose_image_id",
    "control_type",  # the ControlNet type of a pose-conditioned image (the control-type axis)
    "method",  # how a suite group kept its character: independent, shared_attention, ip_adapter
)

# The tag frequency table (tag/tag_frequency.csv and the dataset card).
FREQUENCY_COLUMNS = ["tag", "count", "fraction"]


def kept_rows(manifest: pd.DataFrame, dedupe_table: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows of the kept images (one per kept image_id), in manifest order."""
    kept = dedupe_table.loc[dedupe_table["keep"], ["source_path"]]
    return manifest.merge(kept, on="source_path", how="inner").reset_index(drop=True)


def tag_frequency(tag_lists: Sequence[Sequence[str]]) -> pd.DataFrame:
    """How many images carry each tag: columns tag, count, fraction; most frequent first."""
    counts = Counter(tag for tags in tag_lists for tag in dict.fromkeys(str(t) for t in tags))
    images = len(tag_lists)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return pd.DataFrame(
        [(tag, count, round(count / images, 6)) for tag, count in ranked], columns=FREQUENCY_COLUMNS
    ).astype({"count": "int64"})


def defining_tags(tag_lists: Sequence[Sequence[str]], fraction: float) -> list[str]:
    """Tags carried by at least `fraction` of the images: what makes the character recognisable."""
    if not tag_lists:
        return []
    counts = Counter(tag for tags in tag_lists for tag in set(tags))
    needed = fraction * len(tag_lists)
    return sorted(tag for tag, count in counts.items() if count >= needed - 1e-9)
