"""The statistics of model selection: the weighted composite and its seeded bootstrap intervals.

One resampling helper, `bootstrap_interval`, serves every interval of the report (a row's
composite, the paired difference of two rows, a plain mean): it draws the (draws, n) index matrix
from one seeded generator and takes percentile bounds of the statistic over the resamples. The
draws are those of numpy's `default_rng(seed).integers(0, n, (draws, n))`, so a seed names the
same resamples on every machine. `scipy.stats.bootstrap` would draw differently (and default to
BCa), changing every published interval; it is not used.

Nothing here knows about rendering or MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# The columns that name one row of the ranking: a candidate at a checkpoint and a LoRA scale.
KEY = ["candidate", "step", "lora_scale"]
# What a metric with no value at all in a row scores: the worst a cosine-like or share metric can
# be, so a LoRA that loses the face does not gain by it.
MISSING_FILL = 0.0


@dataclass(frozen=True)
class PairedDifference:
    """One row's composite minus another's, paired on (prompt, seed), with a bootstrap CI."""

    difference: float
    ci_low: float
    ci_high: float
    pairs: int

    @property
    def verdict(self) -> str:
        if self.ci_low > 0:
            return "beats"
        if self.ci_high < 0:
            return "worse"
        return "tie"


def composite_of(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted composite of per-image metric values along the image axis (-2).

    `values` is (..., images, metrics) with NaN for missing values: each metric is averaged over
    the images that have it, a metric with no value scores MISSING_FILL.
    """
    present = ~np.isnan(values)
    counts = present.sum(axis=-2)
    sums = np.where(present, values, 0.0).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), MISSING_FILL)
    return means @ weights


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    size: int,
    draws: int,
    confidence: float,
    seed: int,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over `size` items resampled with replacement.

    `statistic` receives the (draws, size) matrix of resampled item indices and returns one value
    per resample (vectorised: the draws are never looped over in Python).
    """
    if size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, size, size=(draws, size))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistic(picks), [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(
    values: np.ndarray, draws: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    return bootstrap_interval(
        lambda picks: values[picks].mean(axis=1), len(values), draws, confidence, seed
    )


def bootstrap_composite_ci(
    values: np.ndarray, weights: np.ndarray, draws: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the composite of an (images, metrics) matrix."""
    return bootstrap_interval(
        lambda picks: composite_of(values[picks], weights), len(values), draws, confidence, seed
    )


def pair_columns(scores: pd.DataFrame) -> list[str]:
    """What pairs two rows' images: the same prompt and seed (and pose, control type and suite
    method, when the sweep has them)."""
    optional = ("pose_image_id", "control_type", "method")
    return ["prompt_index", "seed"] + [name for name in optional if name in scores]


def row_mask(frame: pd.DataFrame, row: pd.Series) -> pd.Series:
    """The images of `frame` that belong to the ranking row `row` (its KEY)."""
    return (
        (frame["candidate"] == row["candidate"])
        & (frame["step"] == row["step"])
        & (frame["lora_scale"] == row["lora_scale"])
    )


def paired_difference(
    scores: pd.DataFrame,
    first: pd.Series,
    second: pd.Series,
    weights: dict[str, float],
    draws: int,
    confidence: float,
    seed: int,
) -> PairedDifference | None:
    """Composite of `first` minus that of `second`, paired on their shared (prompt, seed) images,
    with a percentile bootstrap CI over the pairs; None when they share no pair."""
    pair = pair_columns(scores)
    names, vector = list(weights), np.array(list(weights.values()))
    mine = scores[row_mask(scores, first)]
    theirs = scores[row_mask(scores, second)]
    if mine.duplicated(pair).any() or theirs.duplicated(pair).any():
        log.warning("paired comparison skipped: (prompt, seed) pairs are not unique")
        return None
    joined = mine.merge(theirs, on=pair, suffixes=("", "_other")).sort_values(pair)
    if joined.empty:
        return None
    ours = joined.loc[:, names].to_numpy(dtype=np.float64)
    other = joined.loc[:, [f"{name}_other" for name in names]].to_numpy(dtype=np.float64)

    def difference_of(picks: np.ndarray) -> np.ndarray:
        return composite_of(ours[picks], vector) - composite_of(other[picks], vector)

    low, high = bootstrap_interval(difference_of, len(joined), draws, confidence, seed)
    difference = float(composite_of(ours, vector) - composite_of(other, vector))
    return PairedDifference(difference, low, high, len(joined))
