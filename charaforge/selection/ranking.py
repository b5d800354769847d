"""Ranking: one row per (candidate, step, lora_scale) with its means, composite and CI.

Each row aggregates its (prompt, seed) images: the mean of every metric the score stage produced,
and a composite: the weighted mean of the configured metrics, with a seeded bootstrap confidence
interval over the row's images. Metrics that the score stage marked not applicable (no
pose-conditioned image, no face, a tagger that cannot see pixels) are left out of the composite;
missing values inside an applicable metric (an image with no face) are skipped by the mean, and a
row with no value at all for one scores it MISSING_FILL.

Also here: the tables derived from the ranking that the report and DVC plots show (Pareto front,
composite per prompt, each candidate's best scale per step).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from charaforge.config import ReportConfig
from charaforge.core.files import derive_seed
from charaforge.errors import ConfigError
from charaforge.selection.statistics import (
    KEY,
    bootstrap_composite_ci,
    composite_of,
    row_mask,
)

# The sweep's rows without a LoRA: the baseline every champion is compared with.
BASE_CANDIDATE = "base"


def composite_metrics(
    weights: dict[str, float], metrics: list[str], applicable: dict[str, bool]
) -> dict[str, float]:
    """The weights of the applicable metrics, normalised to sum(|w|) = 1.

    A weight naming no metric of the score stage is a config error; one naming a metric the
    score stage marked not applicable is dropped (and reported).
    """
    unknown = sorted(set(weights) - set(metrics))
    if unknown:
        raise ConfigError(
            f"report.weights: unknown metric(s) {unknown}; the score stage produced: "
            f"{', '.join(metrics)}"
        )
    used = {m: w for m, w in sorted(weights.items()) if applicable.get(m, True) and w != 0}
    if not used:
        raise ConfigError(
            "report.weights: none of the weighted metrics is applicable to this sweep "
            f"(weighted: {sorted(weights)}; not applicable: "
            f"{sorted(m for m, ok in applicable.items() if not ok)})"
        )
    total = sum(abs(w) for w in used.values())
    return {metric: weight / total for metric, weight in used.items()}


def _sorted_group(group: pd.DataFrame) -> pd.DataFrame:
    # Sorted so that the resample does not depend on the order the sweep listed its images.
    return group.sort_values(["prompt_index", "seed", "image_id"])


def _copy_fraction(group: pd.DataFrame, copy_threshold: float | None) -> float:
    """Share of the row's images that copy a training image, by the score stage's verdict."""
    if "memorised" in group:
        return float(group["memorised"].fillna(0.0).mean())
    if "nn_similarity" in group:
        if copy_threshold is None:
            raise ValueError("nn_similarity without `memorised` needs the copy threshold")
        return float((group["nn_similarity"] >= copy_threshold).mean())
    return 0.0


def aggregate(
    scores: pd.DataFrame,
    config: ReportConfig,
    metrics: list[str],
    seed: int,
    applicable: dict[str, bool] | None = None,
    copy_threshold: float | None = None,
) -> pd.DataFrame:
    """One ranked row per (candidate, step, lora_scale) with means, composite and its CI.

    `copy_threshold` is the CLIP cosine at which the score stage counts an image as a copy
    (score.memorisation.copy_threshold, recorded in scorers.json); only needed when the scores
    have `nn_similarity` but no `memorised` verdict.
    """
    applicable = applicable or {}
    weights = composite_metrics(config.weights, metrics, applicable)
    names, vector = list(weights), np.array(list(weights.values()))
    rows = []
    for key, group in scores.groupby(KEY, sort=True):
        candidate, step, lora_scale = key
        group = _sorted_group(group)
        values = group.loc[:, names].to_numpy(dtype=np.float64)
        group_seed = derive_seed(seed, "report.bootstrap", candidate, int(step), float(lora_scale))
        low, high = bootstrap_composite_ci(
            values, vector, config.bootstrap_draws, config.confidence, group_seed
        )
        row = {"candidate": candidate, "step": int(step), "lora_scale": float(lora_scale)}
        for metric in metrics:
            column = group[metric].astype("float64")
            row[metric] = float(column.mean()) if column.notna().any() else float("nan")
        row.update(
            composite=float(composite_of(values, vector)),
            ci_low=low,
            ci_high=high,
            n_images=len(group),
        )
        row["copy_fraction"] = _copy_fraction(group, copy_threshold)
        row["memorising"] = row["copy_fraction"] > config.max_copy_fraction
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.sort_values(
        ["composite", "lora_scale", "step", "candidate"], ascending=[False, True, True, True]
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def lora_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that carry a LoRA (scale > 0, not the base model): the champion's candidates."""
    return table[(table["lora_scale"] > 0) & (table["candidate"] != BASE_CANDIDATE)]


def pareto_front(table: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for rows no other row dominates (>= on both axes, > on one); NaN rows never are."""
    values = table.loc[:, [x, y]].to_numpy(dtype=np.float64)
    valid = ~np.isnan(values).any(axis=1)
    front = np.zeros(len(table), dtype=bool)
    for i in np.flatnonzero(valid):
        others = values[valid]
        dominated = (
            (others[:, 0] >= values[i, 0])
            & (others[:, 1] >= values[i, 1])
            & ((others[:, 0] > values[i, 0]) | (others[:, 1] > values[i, 1]))
        )
        front[i] = not dominated.any()
    return pd.Series(front, index=table.index)


def pareto_axes(
    config: ReportConfig, metrics: list[str], applicable: dict[str, bool]
) -> tuple[str, str] | None:
    """(identity, alignment) metrics of the Pareto front, or None when either is unavailable."""
    identity = next((m for m in config.pareto_identity if m in metrics and applicable.get(m)), None)
    alignment = config.pareto_alignment
    if identity is not None and alignment in metrics and applicable.get(alignment):
        return identity, alignment
    return None


def pareto_table(table: pd.DataFrame, axes: tuple[str, str]) -> pd.DataFrame:
    """The DVC plot of the front, with fixed column names (`identity`, `alignment`)."""
    identity, alignment = axes
    frame = table.sort_values(["candidate", "step", "lora_scale"]).reset_index(drop=True)
    return pd.DataFrame(
        {
            "candidate": frame["candidate"],
            "step": frame["step"],
            "lora_scale": frame["lora_scale"],
            "identity": frame[identity].round(6),
            "alignment": frame[alignment].round(6),
            "identity_metric": identity,
            "alignment_metric": alignment,
            "composite": frame["composite"].round(6),
            "pareto": frame["pareto"],
            "memorising": frame["memorising"],
        }
    )


def row_label(row: pd.Series) -> str:
    if row["candidate"] == BASE_CANDIDATE:
        return "base"
    return f"{row['candidate']} step {int(row['step'])} scale {float(row['lora_scale']):g}"


def highlight_rows(table: pd.DataFrame, champion: pd.Series) -> pd.DataFrame:
    """Champion, baseline, and each candidate's best row: the per-prompt breakdown's columns."""
    picks = [champion]
    base = table[table["candidate"] == BASE_CANDIDATE]
    if len(base):
        picks.append(base.iloc[0])
    for candidate in sorted(table["candidate"].unique()):
        if candidate != BASE_CANDIDATE:
            picks.append(table[table["candidate"] == candidate].iloc[0])
    frame = pd.DataFrame(picks)
    return frame.drop_duplicates(subset=KEY).reset_index(drop=True)


def per_prompt_breakdown(
    scores: pd.DataFrame, rows: pd.DataFrame, weights: dict[str, float]
) -> pd.DataFrame:
    """Composite per prompt (columns: prompt_index, prompt, one column per row label)."""
    names, vector = list(weights), np.array(list(weights.values()))
    prompts = (
        scores.loc[:, ["prompt_index", "prompt"]]
        .drop_duplicates("prompt_index")
        .sort_values("prompt_index")
        .reset_index(drop=True)
    )
    result = prompts.copy()
    for _, row in rows.iterrows():
        label = row_label(row)
        values = []
        mine = scores[row_mask(scores, row)]
        for prompt_index in prompts["prompt_index"]:
            images = mine[mine["prompt_index"] == prompt_index]
            matrix = images.loc[:, names].to_numpy(dtype=np.float64)
            values.append(float(composite_of(matrix, vector)) if len(images) else float("nan"))
        result[label] = np.round(values, 6)
    return result


def best_scale_by_step(table: pd.DataFrame, metrics: list[str]) -> dict[str, pd.DataFrame]:
    """Per LoRA candidate: at each step, the row of its best LoRA scale (ties: smaller scale)."""
    lora = lora_rows(table)
    curves = {}
    for candidate in sorted(lora["candidate"].unique()):
        rows = lora[lora["candidate"] == candidate].sort_values(
            ["step", "composite", "lora_scale"], ascending=[True, False, True]
        )
        best = rows.groupby("step", sort=True).head(1)
        columns = ["step", "lora_scale", "composite", *metrics, "ci_low", "ci_high"]
        curves[candidate] = best.loc[:, columns].round(6).reset_index(drop=True)
    return curves
