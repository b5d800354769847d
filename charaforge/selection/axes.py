"""Condition axes scored side by side: suite methods and control types.

The sweep can render the same prompts and seeds several ways: a suite's `method` list (plain
`independent`, `shared_attention`, `ip_adapter`) or `eval.pose.control_types`. The index says
which way in its `method` / `control_type` columns. Here each level of an axis gets every shown
metric's mean over its images, and the axis's headline metric (consistency for methods, pose OKS
for control types, else CLIP-T) a paired difference to the first level, matched on candidate,
step, scale, prompt and seed (and pose), with a percentile bootstrap interval over the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from charaforge.selection.statistics import bootstrap_interval

# Axis column -> (label, the levels' preferred order, headline metrics in order of preference).
AXES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "method": (
        "Suite method",
        ("independent", "shared_attention", "ip_adapter"),
        ("consistency_clip", "consistency_arcface"),
    ),
    "control_type": ("Control type", ("openpose",), ("pose_oks", "pose_pck_02", "clip_t")),
}
PAIR_KEY = ["candidate", "step", "lora_scale", "prompt_index", "seed", "pose_image_id"]


@dataclass(frozen=True)
class AxisTable:
    column: str
    label: str
    headline: str
    reference: str  # the level the differences are taken against
    header: list[str]
    rows: list[list[str]]


def _format(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"


def axis_tables(
    scores: pd.DataFrame, metrics: list[str], draws: int, confidence: float, seed: int
) -> list[AxisTable]:
    """One table per axis with two or more levels in the scores (none otherwise)."""
    tables = []
    for column, (label, preferred, headlines) in AXES.items():
        if column not in scores.columns:
            continue
        rows = scores[scores[column].notna()]
        if column == "method":
            # Methods differ only on the frames of suite groups (each identity shot renders
            # alone whatever the method).
            rows = rows[rows["suite"].notna() & ~rows["identity_shot"].fillna(False).astype(bool)]
        levels = sorted(
            set(rows[column]),
            key=lambda v: (v not in preferred, preferred.index(v) if v in preferred else 0, v),
        )
        if len(levels) < 2:
            continue
        shown = [m for m in metrics if m in rows.columns]
        headline = next((m for m in headlines if m in shown and rows[m].notna().any()), None)
        if headline is None:
            continue
        tables.append(_table(rows, column, label, levels, shown, headline, draws, confidence, seed))
    return tables


def _table(
    rows: pd.DataFrame,
    column: str,
    label: str,
    levels: list[str],
    shown: list[str],
    headline: str,
    draws: int,
    confidence: float,
    seed: int,
) -> AxisTable:
    reference = levels[0]
    key = [name for name in PAIR_KEY if name in rows.columns]
    base = rows[rows[column] == reference].dropna(subset=[headline])
    header = [label, "images", *shown, f"{headline} vs {reference} (paired)", "pairs"]
    body = []
    for level in levels:
        mine = rows[rows[column] == level]
        means = [_format(float(mine[m].mean())) if mine[m].notna().any() else "n/a" for m in shown]
        if level == reference:
            difference, pairs = "reference", "-"
        else:
            joined = mine.dropna(subset=[headline]).merge(base, on=key, suffixes=("", "_reference"))
            values = (joined[headline] - joined[f"{headline}_reference"]).to_numpy(np.float64)
            pairs = str(len(values))
            if len(values) == 0:
                difference = "no pairs"
            else:
                low, high = _mean_interval(values, draws, confidence, seed)
                difference = f"{values.mean():+.4f} [{low:+.4f}, {high:+.4f}]"
        body.append([level, str(len(mine)), *means, difference, pairs])
    return AxisTable(column, label, headline, reference, header, body)


def _mean_interval(
    values: np.ndarray, draws: int, confidence: float, seed: int
) -> tuple[float, float]:
    return bootstrap_interval(
        lambda picks: values[picks].mean(axis=1), len(values), draws, confidence, seed
    )
