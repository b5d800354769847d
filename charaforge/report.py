"""Model selection: rank candidate x checkpoint x LoRA scale, name the champion, write the report.

Each (candidate, step, lora_scale) row aggregates its (prompt, seed) images: the mean of every
metric the score stage produced, and a composite: the weighted mean of the configured metrics,
with a seeded bootstrap confidence interval over the row's images. With a handful of prompts and
seeds per row, neighbouring rows are often within noise of each other, so the champion is chosen
by a stated rule (SELECTION_RULE) instead of by the top mean alone; a row that copies its training
images (memorisation) is never champion, and the champion is compared with the base model on the
very same (prompt, seed) pairs.

Metrics that the score stage marked not applicable (no pose-conditioned image, no face, a tagger
that cannot see pixels) are left out of the composite and listed as such. Missing values inside
an applicable metric (an image with no face) are skipped by the mean; a row with no value at all
for an applicable metric scores it as 0, which is the worst a cosine-like or share metric can be
(a LoRA that loses the face must not gain by it).

Outputs are byte-deterministic: no timestamps, run ids or absolute paths; the HTML is
self-contained (CSS inline, every image a data: URI) so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from charaforge.config import ConfigError, ReportConfig
from charaforge.io import atomic_path, derive_seed, write_csv, write_json, write_text

log = logging.getLogger(__name__)

KEY = ["candidate", "step", "lora_scale"]
BASE_CANDIDATE = "base"
MISSING_FILL = 0.0
DEFAULT_COPY_THRESHOLD = 0.95
SELECTION_RULE = (
    "Only LoRA-bearing rows (LoRA scale > 0) that do not memorise their training set (at most "
    "{max_copy:.0%} of their images copies of a training image, see the memorisation guard) "
    "can be champion. Among them the row with the highest mean composite is the provisional "
    "champion. An eligible row is a statistical tie with it when the {confidence:.0%} paired "
    "bootstrap confidence interval of their composite difference, over the (prompt, seed) "
    "images both rendered from the same noise, includes 0 (rows that cannot be paired: when "
    "their own confidence intervals overlap). Among the tied rows the champion is the one with "
    "the smallest LoRA scale, then the earliest step, then the higher mean composite, then the "
    "candidate name in alphabetical order: the lightest touch that is as good. The base model "
    'row (candidate "base", no LoRA) is the baseline and is never the champion; the champion is '
    "compared with it on the same pairs, and the report says plainly when it is not better."
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


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


@dataclass(frozen=True)
class Selection:
    """The ranked table and the champion chosen from it."""

    table: pd.DataFrame  # one row per (candidate, step, lora_scale), ranked
    champion: pd.Series
    provisional: pd.Series  # the top eligible LoRA row by mean composite
    tied: pd.DataFrame  # eligible rows statistically tied with the provisional champion
    stand_in: tuple[str, ...] = ()  # what was a stand-in model (empty: all real weights)
    baseline: PairedDifference | None = None
    warnings: tuple[str, ...] = ()

    @property
    def statistical_tie(self) -> bool:
        return len(self.tied) > 1


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


def composite_scores(scores: pd.DataFrame, weights: dict[str, float]) -> pd.Series:
    """Per image: sum(weight * metric), a missing value counting MISSING_FILL."""
    composite = pd.Series(0.0, index=scores.index)
    for metric, weight in sorted(weights.items()):
        composite = composite + weight * scores[metric].astype("float64").fillna(MISSING_FILL)
    return composite


def bootstrap_ci(
    values: np.ndarray, draws: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_composite_ci(
    values: np.ndarray, weights: np.ndarray, draws: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the composite of an (images, metrics) matrix."""
    if len(values) == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(draws, len(values)))
    composites = composite_of(values[picks], weights)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(composites, [tail, 1.0 - tail])
    return float(low), float(high)


def _pair_columns(scores: pd.DataFrame) -> list[str]:
    return ["prompt_index", "seed"] + (["pose_image_id"] if "pose_image_id" in scores else [])


def _sorted_group(group: pd.DataFrame) -> pd.DataFrame:
    # Sorted so that the resample does not depend on the order the sweep listed its images.
    return group.sort_values(["prompt_index", "seed", "image_id"])


def aggregate(
    scores: pd.DataFrame,
    config: ReportConfig,
    metrics: list[str],
    seed: int,
    applicable: dict[str, bool] | None = None,
    copy_threshold: float = DEFAULT_COPY_THRESHOLD,
) -> pd.DataFrame:
    """One ranked row per (candidate, step, lora_scale) with means, composite and its CI."""
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
        if "memorised" in group:
            row["copy_fraction"] = float(group["memorised"].fillna(0.0).mean())
        elif "nn_similarity" in group:
            row["copy_fraction"] = float((group["nn_similarity"] >= copy_threshold).mean())
        else:
            row["copy_fraction"] = 0.0
        row["memorising"] = row["copy_fraction"] > config.max_copy_fraction
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.sort_values(
        ["composite", "lora_scale", "step", "candidate"], ascending=[False, True, True, True]
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def choose_champion(
    table: pd.DataFrame,
    scores: pd.DataFrame | None = None,
    weights: dict[str, float] | None = None,
    config: ReportConfig | None = None,
    seed: int = 0,
) -> Selection:
    """Apply SELECTION_RULE to a ranked table.

    With the per-image `scores` (and the composite `weights` and `config`), a row ties with the
    provisional champion when the paired bootstrap CI of their composite difference, over the
    (prompt, seed) pairs both rendered, includes 0: every candidate renders a prompt from the same
    noise, so pairing removes the prompt-to-prompt spread that dominates the rows' own CIs.
    Without them, or when the rows cannot be paired, overlapping CIs are the tie test.
    """
    lora_rows = table[(table["lora_scale"] > 0) & (table["candidate"] != BASE_CANDIDATE)]
    if lora_rows.empty:
        raise ValueError("no LoRA-bearing rows (lora_scale > 0) to choose a champion from")
    warnings: list[str] = []
    eligible = lora_rows
    if "memorising" in lora_rows:
        eligible = lora_rows[~lora_rows["memorising"].astype(bool)]
        if eligible.empty:
            warnings.append(
                "Every LoRA row memorises its training set: the champion below copies training "
                "images and should not be used."
            )
            eligible = lora_rows
    provisional = eligible.iloc[0]  # the table is ranked by composite
    tied_mask = []
    for _, row in eligible.iterrows():
        difference = None
        if scores is not None and weights is not None and config is not None:
            parts = ("report.tie", row["candidate"], int(row["step"]), float(row["lora_scale"]))
            difference = paired_difference(
                scores, provisional, row, weights, config, derive_seed(seed, *parts)
            )
        if difference is None:
            tied_mask.append(
                row["ci_low"] <= provisional["ci_high"] and provisional["ci_low"] <= row["ci_high"]
            )
        else:
            tied_mask.append(difference.ci_low <= 0.0)
    tied = eligible[np.array(tied_mask, dtype=bool)].sort_values(
        ["lora_scale", "step", "composite", "candidate"], ascending=[True, True, False, True]
    )
    return Selection(
        table=table,
        champion=tied.iloc[0],
        provisional=provisional,
        tied=tied,
        warnings=tuple(warnings),
    )


def _row_mask(frame: pd.DataFrame, row: pd.Series) -> pd.Series:
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
    config: ReportConfig,
    seed: int,
) -> PairedDifference | None:
    """Composite of `first` minus that of `second`, paired on their shared (prompt, seed) images,
    with a percentile bootstrap CI over the pairs; None when they share no pair."""
    pair = _pair_columns(scores)
    names, vector = list(weights), np.array(list(weights.values()))
    mine = scores[_row_mask(scores, first)]
    theirs = scores[_row_mask(scores, second)]
    if mine.duplicated(pair).any() or theirs.duplicated(pair).any():
        log.warning("paired comparison skipped: (prompt, seed) pairs are not unique")
        return None
    joined = mine.merge(theirs, on=pair, suffixes=("", "_other")).sort_values(pair)
    if joined.empty:
        return None
    ours = joined.loc[:, names].to_numpy(dtype=np.float64)
    other = joined.loc[:, [f"{name}_other" for name in names]].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(joined), size=(config.bootstrap_draws, len(joined)))
    differences = composite_of(ours[picks], vector) - composite_of(other[picks], vector)
    tail = (1.0 - config.confidence) / 2.0
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    difference = float(composite_of(ours, vector) - composite_of(other, vector))
    return PairedDifference(difference, float(low), float(high), len(joined))


def compare_with_baseline(
    scores: pd.DataFrame,
    champion: pd.Series,
    weights: dict[str, float],
    config: ReportConfig,
    seed: int,
) -> PairedDifference | None:
    """Paired bootstrap of champion minus base composite over the shared (prompt, seed) pairs."""
    base = scores[scores["candidate"] == BASE_CANDIDATE]
    if base.empty:
        return None
    return paired_difference(
        scores, champion, base.iloc[0], weights, config, derive_seed(seed, "report.baseline")
    )


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
        mine = scores[_row_mask(scores, row)]
        for prompt_index in prompts["prompt_index"]:
            images = mine[mine["prompt_index"] == prompt_index]
            matrix = images.loc[:, names].to_numpy(dtype=np.float64)
            values.append(float(composite_of(matrix, vector)) if len(images) else float("nan"))
        result[label] = np.round(values, 6)
    return result


def row_label(row: pd.Series) -> str:
    if row["candidate"] == BASE_CANDIDATE:
        return "base"
    return f"{row['candidate']} step {int(row['step'])} scale {float(row['lora_scale']):g}"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _stand_in_sources(
    scorers: dict[str, Any], train_summary: dict[str, Any], base_model: dict[str, Any] | None
) -> list[str]:
    sources = [
        f"scorer {name} ({info.get('model')})"
        for name, info in sorted(scorers.items())
        if info.get("stand_in") and info.get("applicable", True)
    ]
    if base_model is not None and base_model.get("stand_in"):
        sources.append("base model")
    elif base_model is None and train_summary.get("stand_in"):
        sources.append("base model (per the training summary)")
    return sources


def _highlight_rows(selection: Selection) -> pd.DataFrame:
    """Champion, baseline, and each candidate's best row: the per-prompt breakdown's columns."""
    table = selection.table
    picks = [selection.champion]
    base = table[table["candidate"] == BASE_CANDIDATE]
    if len(base):
        picks.append(base.iloc[0])
    for candidate in sorted(table["candidate"].unique()):
        if candidate != BASE_CANDIDATE:
            picks.append(table[table["candidate"] == candidate].iloc[0])
    frame = pd.DataFrame(picks)
    return frame.drop_duplicates(subset=KEY).reset_index(drop=True)


def report_selection(
    score_dir: str | Path,
    generate_dir: str | Path,
    train_dir: str | Path,
    config: ReportConfig,
    out_dir: str | Path,
    base_dir: str | Path = "data/base",
    *,
    seed: int,
    root: str | Path = ".",
) -> Selection:
    """Rank, choose the champion and write metrics.json, selection.md/.html and the plots.

    Image paths in the tables are relative to the repository root `root` (data-contracts.md).
    """
    score_dir, out_dir = Path(score_dir), Path(out_dir)
    scores = pd.read_parquet(score_dir / "scores.parquet")
    scorers = _read_json(score_dir / "scorers.json")
    if scorers is None:
        raise FileNotFoundError(f"{score_dir}/scorers.json not found (run the score stage)")
    metrics = [name for name in sorted(scorers) if name in scores.columns]
    applicable = {name: bool(scorers[name].get("applicable", True)) for name in metrics}
    train_summary = _read_json(Path(train_dir) / "summary.json")
    if train_summary is None:
        raise FileNotFoundError(f"{train_dir}/summary.json not found (run the train stage)")
    base_model = _read_json(Path(base_dir) / "model.json")
    index = pd.read_parquet(Path(generate_dir) / "index.parquet")
    copy_threshold = float(
        scorers.get("nn_similarity", {}).get("copy_threshold", DEFAULT_COPY_THRESHOLD)
    )

    weights = composite_metrics(config.weights, metrics, applicable)
    table = aggregate(scores, config, metrics, seed, applicable, copy_threshold)
    for name in table["candidate"].unique():
        if not _SAFE_NAME.match(str(name)):
            raise ValueError(f"candidate name {name!r} cannot name a plot file")
    identity = next((m for m in config.pareto_identity if m in metrics and applicable.get(m)), None)
    alignment = config.pareto_alignment
    if identity is not None and alignment in metrics and applicable.get(alignment):
        table["pareto"] = pareto_front(table, identity, alignment)
    else:
        identity, table["pareto"] = None, False
    selection = choose_champion(table, scores, weights, config, seed)
    stand_in = _stand_in_sources(scorers, train_summary, base_model)
    baseline = compare_with_baseline(scores, selection.champion, weights, config, seed)
    selection = replace(selection, stand_in=tuple(stand_in), baseline=baseline)
    base_rows = table[table["candidate"] == BASE_CANDIDATE]
    baseline_composite = float(base_rows["composite"].iloc[0]) if len(base_rows) else None
    log.info(
        "champion %s step %d scale %g: composite %.4f%s",
        selection.champion["candidate"],
        selection.champion["step"],
        selection.champion["lora_scale"],
        selection.champion["composite"],
        " (statistical tie)" if selection.statistical_tie else "",
    )

    shown = [m for m in metrics if applicable[m]]
    context = _Context(
        config=config,
        selection=selection,
        metrics=shown,
        not_applicable={m: str(scorers[m].get("reason", "")) for m in metrics if not applicable[m]},
        weights=weights,
        scorers=scorers,
        train_summary=train_summary,
        stand_in=stand_in,
        baseline_composite=baseline_composite,
        pareto_axes=(identity, alignment) if identity else None,
        copy_threshold=copy_threshold,
        breakdown=per_prompt_breakdown(scores, _highlight_rows(selection), weights),
    )
    write_json(out_dir / "metrics.json", _metrics_payload(context))
    write_text(out_dir / "selection.md", _markdown(context))
    by_step = _best_scale_by_step(table, shown)
    with atomic_path(out_dir / "plots" / "score_by_step") as plots_dir:
        plots_dir.mkdir()
        for candidate, frame in by_step.items():
            write_csv(plots_dir / f"{candidate}.csv", frame)
    plot_columns = ["composite", *[m for m in weights if m in shown]]
    step_png = _plot_by_step(by_step, plot_columns, baseline_composite, bool(stand_in), config)
    pareto_png = None
    if context.pareto_axes is not None:
        write_csv(out_dir / "plots" / "pareto.csv", _pareto_frame(table, context.pareto_axes))
        pareto_png = _plot_pareto(table, context)
    thumbnails = _Thumbnails(Path(root), config.thumbnail_size)
    sheets = {
        candidate: _contact_sheet(index, scores, candidate, shown, thumbnails)
        for candidate in by_step
    }
    write_text(out_dir / "selection.html", _html(context, step_png, pareto_png, sheets))
    return selection


@dataclass(frozen=True)
class _Context:
    config: ReportConfig
    selection: Selection
    metrics: list[str]  # the applicable metrics, shown in every table
    not_applicable: dict[str, str]  # metric -> why
    weights: dict[str, float]  # normalised weights of the composite
    scorers: dict[str, Any]
    train_summary: dict[str, Any]
    stand_in: list[str]
    baseline_composite: float | None
    pareto_axes: tuple[str, str] | None
    copy_threshold: float
    breakdown: pd.DataFrame = field(default_factory=pd.DataFrame)


def _r(value: float) -> float | None:
    value = float(value)
    return None if np.isnan(value) else round(value, 6)


def _metrics_payload(context: _Context) -> dict[str, Any]:
    champion = context.selection.champion
    baseline = context.selection.baseline
    return {
        "champion": {
            "candidate": str(champion["candidate"]),
            "step": int(champion["step"]),
            "lora_scale": _r(champion["lora_scale"]),
            **{metric: _r(champion[metric]) for metric in context.metrics},
            "composite": _r(champion["composite"]),
            "ci_low": _r(champion["ci_low"]),
            "ci_high": _r(champion["ci_high"]),
            "n_images": int(champion["n_images"]),
            "copy_fraction": _r(champion["copy_fraction"]),
        },
        "baseline_composite": None
        if context.baseline_composite is None
        else _r(context.baseline_composite),
        "champion_minus_baseline": None
        if baseline is None
        else {
            "difference": _r(baseline.difference),
            "ci_low": _r(baseline.ci_low),
            "ci_high": _r(baseline.ci_high),
            "pairs": baseline.pairs,
            "verdict": baseline.verdict,
        },
        "statistical_tie": context.selection.statistical_tie,
        "stand_in": bool(context.stand_in),
        "confidence": context.config.confidence,
        "weights": {metric: _r(weight) for metric, weight in context.weights.items()},
        "not_applicable": sorted(context.not_applicable),
        "rows_ranked": len(context.selection.table),
        "rows_memorising": int(context.selection.table["memorising"].sum()),
    }


def _best_scale_by_step(table: pd.DataFrame, metrics: list[str]) -> dict[str, pd.DataFrame]:
    """Per LoRA candidate: at each step, the row of its best LoRA scale (ties: smaller scale)."""
    lora = table[(table["lora_scale"] > 0) & (table["candidate"] != BASE_CANDIDATE)]
    curves = {}
    for candidate in sorted(lora["candidate"].unique()):
        rows = lora[lora["candidate"] == candidate].sort_values(
            ["step", "composite", "lora_scale"], ascending=[True, False, True]
        )
        best = rows.groupby("step", sort=True).head(1)
        columns = ["step", "lora_scale", "composite", *metrics, "ci_low", "ci_high"]
        curves[candidate] = best.loc[:, columns].round(6).reset_index(drop=True)
    return curves


def _pareto_frame(table: pd.DataFrame, axes: tuple[str, str]) -> pd.DataFrame:
    """Fixed column names (`identity`, `alignment`) so that a DVC plot can name its axes."""
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


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    # metadata drops the Software/version text chunk so that the bytes depend on the data only.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


_RC = {"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "cf"}


def _plot_by_step(
    by_step: dict[str, pd.DataFrame],
    panels: list[str],
    baseline: float | None,
    stand_in: bool,
    config: ReportConfig,
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rc_context pins what could differ between machines.
    with plt.rc_context(_RC):
        columns = min(3, len(panels))
        rows = -(-len(panels) // columns)
        figure, axes = plt.subplots(
            rows, columns, figsize=(4.2 * columns, 3.2 * rows), dpi=100, squeeze=False
        )
        for axis in axes.ravel()[len(panels) :]:
            axis.set_visible(False)
        for axis, panel in zip(axes.ravel(), panels, strict=False):
            for candidate, frame in by_step.items():
                if panel == "composite":
                    error = [
                        frame["composite"] - frame["ci_low"],
                        frame["ci_high"] - frame["composite"],
                    ]
                    axis.errorbar(
                        frame["step"], frame[panel], yerr=error, marker="o", capsize=3,
                        label=candidate,
                    )  # fmt: skip
                else:
                    axis.plot(frame["step"], frame[panel], marker="o", label=candidate)
            if panel == "composite" and baseline is not None:
                axis.axhline(baseline, color="grey", linestyle="--", label="base (no LoRA)")
            axis.set_xlabel("step")
            axis.set_title(
                f"composite at each step's best scale ({config.confidence:.0%} CI)"
                if panel == "composite"
                else f"{panel} at that scale"
            )
            axis.grid(alpha=0.3)
        axes.ravel()[0].legend(fontsize=7)
        if stand_in:
            figure.suptitle("computed with stand-in models (random weights)", color="#a05000")
        figure.tight_layout()
        return _figure_png(figure)


def _plot_pareto(table: pd.DataFrame, context: _Context) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = context.pareto_axes  # type: ignore[misc]
    champion = context.selection.champion
    with plt.rc_context(_RC):
        figure, axis = plt.subplots(figsize=(6, 4.5), dpi=100)
        for candidate in sorted(table["candidate"].unique()):
            rows = table[table["candidate"] == candidate]
            marker = "s" if candidate == BASE_CANDIDATE else "o"
            axis.scatter(rows[x], rows[y], marker=marker, alpha=0.7, label=candidate)
        front = table[table["pareto"]].sort_values(x)
        axis.plot(front[x], front[y], color="black", linewidth=1, label="Pareto front")
        memorising = table[table["memorising"]]
        if len(memorising):
            axis.scatter(
                memorising[x], memorising[y], marker="x", color="red", s=60,
                label="memorising (ineligible)",
            )  # fmt: skip
        axis.scatter(
            [champion[x]], [champion[y]], marker="*", s=250, color="gold", edgecolor="black",
            label="champion", zorder=5,
        )  # fmt: skip
        axis.set_xlabel(f"identity: {x}")
        axis.set_ylabel(f"prompt alignment: {y}")
        axis.set_title("one point per candidate x step x LoRA scale")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        if context.stand_in:
            figure.suptitle("computed with stand-in models (random weights)", color="#a05000")
        figure.tight_layout()
        return _figure_png(figure)


class _Thumbnails:
    """PNG data URIs of downscaled sweep images, each encoded once (base images recur per sheet)."""

    def __init__(self, root: Path, size: int) -> None:
        self.root, self.size = root, size
        self._uris: dict[str, str | None] = {}

    def __call__(self, image_path: str) -> str | None:
        if image_path not in self._uris:
            self._uris[image_path] = self._encode(self.root / image_path)
        return self._uris[image_path]

    def _encode(self, path: Path) -> str | None:
        if not path.is_file():
            log.warning("contact sheet: %s is missing", path)
            return None
        with Image.open(path) as image:
            image = image.convert("RGB")
            if max(image.size) > self.size:
                image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=6)
        return _png_data_uri(buffer.getvalue())


def _contact_sheet(
    index: pd.DataFrame,
    scores: pd.DataFrame,
    candidate: str,
    metrics: list[str],
    thumbnails: _Thumbnails,
) -> str:
    """HTML table: rows are prompts, columns base then step x scale, each cell its seeds."""
    composite_of = scores.drop_duplicates("image_id").set_index("image_id")
    rows = index[index["candidate"].isin([candidate, BASE_CANDIDATE])]
    columns = (
        rows.loc[:, ["candidate", "step", "lora_scale"]]
        .drop_duplicates()
        .assign(is_lora=lambda frame: frame["candidate"] != BASE_CANDIDATE)
        .sort_values(["is_lora", "step", "lora_scale"])
    )
    prompts = (
        rows.loc[:, ["prompt_index", "prompt"]]
        .drop_duplicates("prompt_index")
        .sort_values("prompt_index")
    )
    header = "".join(
        f"<th>step {c.step}<br>scale {c.lora_scale:g}</th>" if c.is_lora else "<th>base</th>"
        for c in columns.itertuples()
    )
    body = []
    for prompt in prompts.itertuples():
        cells = []
        for column in columns.itertuples():
            images = rows[
                (rows["prompt_index"] == prompt.prompt_index)
                & (rows["candidate"] == column.candidate)
                & (rows["step"] == column.step)
                & (rows["lora_scale"] == column.lora_scale)
            ].sort_values("seed")
            figures = []
            for image in images.itertuples():
                uri = thumbnails(image.image_path)
                label = f"seed {image.seed}"
                if image.image_id in composite_of.index:
                    scored = composite_of.loc[image.image_id]
                    label += ": " + ", ".join(f"{m} {scored[m]:.3f}" for m in metrics)
                if uri is None:
                    figures.append(f'<span class="missing">missing ({html.escape(label)})</span>')
                else:
                    figures.append(
                        f'<img src="{uri}" width="{thumbnails.size}" alt="{html.escape(label)}" '
                        f'title="{html.escape(label)}">'
                    )
            cells.append(f"<td>{''.join(figures)}</td>")
        body.append(
            f'<tr><th class="prompt">{html.escape(prompt.prompt)}</th>{"".join(cells)}</tr>'
        )
    return f'<table class="sheet"><tr><th>prompt</th>{header}</tr>{"".join(body)}</table>'


def _fmt(value: float) -> str:
    value = float(value)
    # + 0.0 turns a rounded -0.0 into 0.0, so a null value never prints as "-0.0000".
    return "n/a" if np.isnan(value) else f"{round(value, 4) + 0.0:.4f}"


def _baseline_sentence(context: _Context) -> str:
    comparison = context.selection.baseline
    if comparison is None:
        return "No baseline row (scale 0) in the sweep: the champion is not compared with the base."
    confidence = f"{context.config.confidence:.0%}"
    # + 0.0 turns a rounded -0.0 into 0.0, so a null difference never prints as "-0.0000".
    difference = round(comparison.difference, 4) + 0.0
    measured = (
        f"champion minus base model, paired on {comparison.pairs} (prompt, seed) pairs: "
        f"{difference:+.4f} ({confidence} CI {_fmt(comparison.ci_low)} to "
        f"{_fmt(comparison.ci_high)})"
    )
    if comparison.verdict == "beats":
        return f"The champion beats the base model beyond its confidence interval: {measured}."
    if comparison.verdict == "worse":
        return (
            f"The champion is WORSE than the base model without a LoRA, beyond its confidence "
            f"interval: {measured}. No candidate improves on the base model."
        )
    return (
        f"The champion does NOT beat the base model beyond its confidence interval: {measured}. "
        "On this evidence no LoRA is better than the base model without one."
    )


def _champion_sentence(context: _Context) -> str:
    champion = context.selection.champion
    confidence = f"{context.config.confidence:.0%}"
    text = (
        f"{champion['candidate']} at step {champion['step']}, "
        f"LoRA scale {champion['lora_scale']:g}: "
        f"composite {_fmt(champion['composite'])} ({confidence} CI {_fmt(champion['ci_low'])} to "
        f"{_fmt(champion['ci_high'])}, n = {champion['n_images']} images), "
        + ", ".join(f"{metric} {_fmt(champion[metric])}" for metric in context.metrics)
        + "."
    )
    if context.baseline_composite is not None:
        text += f" Baseline (base model, no LoRA): composite {_fmt(context.baseline_composite)}."
    return text


def _tie_sentence(context: _Context) -> str:
    selection = context.selection
    if not selection.statistical_tie:
        return (
            "No statistical tie: every other eligible LoRA row is worse than the champion beyond "
            "the confidence interval of their paired difference."
        )
    provisional = selection.provisional
    others = len(selection.tied) - 1
    return (
        f"Statistical tie: {others} other LoRA row(s) are within noise (the paired confidence "
        f"interval of the difference includes 0) of the top mean composite "
        f"({provisional['candidate']} step "
        f"{provisional['step']} scale {provisional['lora_scale']:g}, "
        f"{_fmt(provisional['composite'])}); the rule below picks among them."
    )


def _memorisation_sentence(context: _Context) -> str:
    table = context.selection.table
    memorising = table[table["memorising"]]
    definition = context.scorers.get("memorised", {}).get(
        "criterion",
        f"its CLIP cosine with a training image is at least {context.copy_threshold:g}",
    )
    text = (
        f"Memorisation guard: an image counts as a copy of a training image when {definition}; "
        f"a row with more than {context.config.max_copy_fraction:.0%} copies is ineligible."
    )
    if memorising.empty:
        return text + " No row memorises its training set."
    labels = ", ".join(row_label(row) for _, row in memorising.iterrows())
    return text + f" Ineligible for memorising: {labels}."


def _note(row: Any, champion: pd.Series) -> str:
    notes = []
    if (row.candidate, row.step, row.lora_scale) == (
        champion["candidate"],
        champion["step"],
        champion["lora_scale"],
    ):
        notes.append("champion")
    elif row.candidate == BASE_CANDIDATE:
        notes.append("baseline")
    if row.memorising:
        notes.append("memorising")
    if row.pareto:
        notes.append("pareto")
    return " ".join(notes)


def _ranking_rows(context: _Context) -> list[list[str]]:
    champion = context.selection.champion
    rows = []
    for row in context.selection.table.itertuples():
        rows.append(
            [
                str(row.rank),
                str(row.candidate),
                str(row.step),
                f"{row.lora_scale:g}",
                *[_fmt(getattr(row, metric)) for metric in context.metrics],
                _fmt(row.composite),
                f"{_fmt(row.ci_low)} to {_fmt(row.ci_high)}",
                str(row.n_images),
                f"{row.copy_fraction:.0%}",
                _note(row, champion),
            ]
        )
    return rows


def _ranking_header(context: _Context) -> list[str]:
    confidence = f"{context.config.confidence:.0%} CI"
    return [
        "rank",
        "candidate",
        "step",
        "LoRA scale",
        *context.metrics,
        "composite",
        confidence,
        "n",
        "copies",
        "note",
    ]


def _banner(context: _Context) -> str:
    return (
        "Computed with stand-in models (" + ", ".join(context.stand_in) + "): random weights built "
        "from a seed. These numbers exercise the pipeline; they say nothing about image quality."
    )


def _formula(context: _Context) -> str:
    return " + ".join(f"{weight:.3g} x {metric}" for metric, weight in context.weights.items())


def _composite_sentence(context: _Context) -> str:
    text = (
        f"Composite = {_formula(context)} (report.weights of the applicable metrics, normalised "
        "to sum(|w|) = 1; each metric is averaged over the images that have it, a row with no "
        f"value scores {MISSING_FILL:g}); the CI is a percentile bootstrap over the row's "
        f"(prompt, seed) images ({context.config.bootstrap_draws} seeded resamples)."
    )
    dropped = sorted(set(context.config.weights) - set(context.weights))
    if dropped:
        text += f" Weighted but not applicable, so left out: {', '.join(dropped)}."
    return text


def _scorer_lines(context: _Context) -> list[str]:
    lines = []
    for name in context.metrics:
        info = context.scorers[name]
        stand_in = ", STAND-IN" if info.get("stand_in") else ""
        line = (
            f"{name}: {info.get('model')} ({info.get('scale')}{stand_in}); "
            f"{info.get('definition', '')}"
        )
        if info.get("ceiling"):
            ceiling = info["ceiling"]
            line += (
                f"; ceiling (same detector on the {ceiling.get('n_photos')} source photos at the "
                f"generated size): {_fmt(ceiling.get(name, float('nan')))}"
            )
        if info.get("defining_tags"):
            line += f"; defining tags: {', '.join(info['defining_tags'])}"
        if "images_without_face" in info:
            line += f"; images without a face: {info['images_without_face']}"
        lines.append(line)
    for name, reason in sorted(context.not_applicable.items()):
        lines.append(f"{name}: not applicable ({reason or 'no data'})")
    return lines


def _candidate_lines(context: _Context) -> list[str]:
    lines = []
    for candidate in context.train_summary.get("candidates", []):
        lines.append(
            f"{candidate.get('name')}: rank {candidate.get('rank')}, "
            f"alpha {candidate.get('alpha')}, learning rate {candidate.get('learning_rate')}, "
            f"checkpoints {candidate.get('checkpoints')}, "
            f"final loss {candidate.get('final_loss')}"
        )
    return lines


def _breakdown_rows(context: _Context) -> tuple[list[str], list[list[str]]]:
    frame = context.breakdown
    labels = [column for column in frame.columns if column not in ("prompt_index", "prompt")]
    rows = [
        [f"#{row['prompt_index']}: {row['prompt']}", *[_fmt(row[label]) for label in labels]]
        for _, row in frame.iterrows()
    ]
    return ["prompt", *labels], rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _rule(context: _Context) -> str:
    return SELECTION_RULE.format(
        confidence=context.config.confidence, max_copy=context.config.max_copy_fraction
    )


def _markdown(context: _Context) -> str:
    parts = [f"# {context.config.title}", ""]
    if context.stand_in:
        parts += [f"> **{_banner(context)}**", ""]
    parts += ["## Champion", "", _champion_sentence(context), "", _baseline_sentence(context), ""]
    parts += [_tie_sentence(context), ""]
    parts += [f"**{warning}**" for warning in context.selection.warnings]
    parts += ["## Selection rule", "", _rule(context), "", _composite_sentence(context), ""]
    parts += [_memorisation_sentence(context), ""]
    parts += ["## Ranking", "", *_md_table(_ranking_header(context), _ranking_rows(context))]
    parts += ["", "## Composite per prompt", ""]
    parts += _md_table(*_breakdown_rows(context))
    parts += ["", "## Scorers", ""] + [f"- {line}" for line in _scorer_lines(context)]
    parts += ["", "## Candidates", ""] + [f"- {line}" for line in _candidate_lines(context)]
    parts += [
        "",
        "Images, contact sheets, the score-versus-step curves and the Pareto plot: selection.html.",
        "",
    ]
    return "\n".join(parts)


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em 1em; font-weight: bold; }
.warning { color: #a00; font-weight: bold; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; font-size: 0.85em; text-align: left; }
tr.champion { background: #d4edda; font-weight: bold; }
tr.baseline { background: #eee; }
tr.memorising { color: #a00; }
table.sheet img { image-rendering: pixelated; margin: 1px; vertical-align: top; }
th.prompt { max-width: 14em; font-weight: normal; }
.missing { color: #a00; font-size: 0.8em; }
"""


def _html_table(header: list[str], rows: list[list[str]], css: list[str] | None = None) -> str:
    esc = html.escape
    parts = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for number, row in enumerate(rows):
        classes = css[number] if css else ""
        attribute = f' class="{esc(classes)}"' if classes else ""
        parts.append(
            f"<tr{attribute}>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>"
        )
    return "".join(parts) + "</table>"


def _html(
    context: _Context, step_png: bytes, pareto_png: bytes | None, sheets: dict[str, str]
) -> str:
    esc = html.escape
    stand_in_note = " (stand-in models)" if context.stand_in else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(context.config.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(context.config.title)}</h1>",
    ]
    if context.stand_in:
        parts.append(f'<p class="banner">{esc(_banner(context))}</p>')
    parts += [
        "<h2>Champion</h2>",
        f"<p>{esc(_champion_sentence(context))}</p>",
        f"<p><strong>{esc(_baseline_sentence(context))}</strong></p>",
        f"<p>{esc(_tie_sentence(context))}</p>",
        *[f'<p class="warning">{esc(w)}</p>' for w in context.selection.warnings],
        "<h2>Selection rule</h2>",
        f"<p>{esc(_rule(context))}</p>",
        f"<p>{esc(_composite_sentence(context))}</p>",
        f"<p>{esc(_memorisation_sentence(context))}</p>",
        "<h2>Ranking</h2>",
    ]
    rows = _ranking_rows(context)
    parts.append(_html_table(_ranking_header(context), rows, [row[-1] for row in rows]))
    parts += [
        f"<h2>Score versus step{esc(stand_in_note)}</h2>",
        f'<img class="plot" src="{_png_data_uri(step_png)}" '
        'alt="composite and weighted metrics versus step">',
    ]
    if pareto_png is not None:
        x, y = context.pareto_axes  # type: ignore[misc]
        parts += [
            f"<h2>Pareto front: identity ({esc(x)}) vs prompt alignment ({esc(y)})"
            f"{esc(stand_in_note)}</h2>",
            f'<img class="plot" src="{_png_data_uri(pareto_png)}" alt="Pareto plot">',
        ]
    else:
        parts.append("<h2>Pareto front</h2><p>No applicable identity and alignment metrics.</p>")
    parts += [
        f"<h2>Composite per prompt{esc(stand_in_note)}</h2>",
        _html_table(*_breakdown_rows(context)),
        "<h2>Scorers</h2><ul>",
        *[f"<li>{esc(line)}</li>" for line in _scorer_lines(context)],
        "</ul><h2>Candidates</h2><ul>",
        *[f"<li>{esc(line)}</li>" for line in _candidate_lines(context)],
        f"</ul><h2>Contact sheets{esc(stand_in_note)}</h2>",
    ]
    for candidate, sheet in sheets.items():
        parts += [f"<h3>{esc(candidate)}</h3>", sheet]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def promote_champion(
    selection: Selection,
    train_dir: str | Path,
    registered_model: str,
    stand_in: bool,
) -> str | None:
    """Register the champion checkpoint in the MLflow registry with the alias `champion`.

    Needs an active MLflow run (the stage's): the checkpoint folder is logged to it as the
    artifact `champion`, a model version is created from that artifact, and the alias moves to
    it, so `models:/<registered_model>@champion` always names the latest selection. Returns the
    version, or None when the checkpoint folder is absent (nothing to promote).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    champion = selection.champion
    checkpoint = Path(train_dir) / str(champion["candidate"]) / f"checkpoint-{champion['step']}"
    if not checkpoint.is_dir():
        log.warning(
            "champion checkpoint %s not found: nothing promoted in the registry", checkpoint
        )
        return None
    mlflow.log_artifacts(str(checkpoint), artifact_path="champion")
    client = MlflowClient()
    try:
        client.create_registered_model(registered_model)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {
        "candidate": str(champion["candidate"]),
        "step": str(int(champion["step"])),
        "lora_scale": f"{champion['lora_scale']:g}",
        "composite": f"{champion['composite']:.6f}",
        "statistical_tie": str(selection.statistical_tie),
        "stand_in": str(stand_in),
    }
    version = client.create_model_version(
        registered_model,
        source=mlflow.get_artifact_uri("champion"),
        run_id=mlflow.active_run().info.run_id,
        tags=tags,
        description=(
            f"{tags['candidate']} step {tags['step']} at LoRA scale {tags['lora_scale']}"
            + (" (computed with stand-in models)" if stand_in else "")
        ),
    )
    client.set_registered_model_alias(registered_model, "champion", version.version)
    log.info("registry: %s version %s is now @champion", registered_model, version.version)
    return str(version.version)
