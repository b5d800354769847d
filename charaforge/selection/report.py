"""Model selection, the one entry the `report` stage calls: rank candidate x checkpoint x LoRA
scale, name the champion, write metrics.json, selection.md/.html and the DVC plots.

The pieces: `ranking` (rows, composite, Pareto, per prompt), `statistics` (bootstrap intervals,
paired differences), `champion` (the rule, ties, the baseline), `wording` / `plots` / `render`
(the pages, from `templates/`), `tracking` (MLflow). An earlier stage's missing or unreadable
output is a `MissingInputError` naming the stage to run.

Outputs are byte-deterministic: no timestamps or absolute paths, and run ids only in the pages'
MLflow links (`mlflow_links`, between their marker comments; `report.mlflow_links=false` leaves
them out); the HTML is self-contained (CSS inline, every image a data: URI) so it can be mailed
or archived as one file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from charaforge.config import ReportConfig
from charaforge.core.files import atomic_path, write_csv, write_json, write_text
from charaforge.errors import ConfigError, MissingInputError, require_stage_output
from charaforge.selection.axes import axis_tables
from charaforge.selection.champion import (
    Selection,
    baseline_composite,
    choose_champion,
    compare_with_baseline,
)
from charaforge.selection.ground_truth import read_ground_truth
from charaforge.selection.mlflow_links import DEFAULT_UI, MlflowLinks
from charaforge.selection.plots import Thumbnails, contact_sheet, plot_by_step, plot_pareto
from charaforge.selection.ranking import (
    aggregate,
    best_scale_by_step,
    composite_metrics,
    highlight_rows,
    pareto_axes,
    pareto_front,
    pareto_table,
    per_prompt_breakdown,
)
from charaforge.selection.render import ReportExtras, render_html, render_markdown
from charaforge.selection.run_summary import (
    DataDirs,
    dataset_summary,
    loss_plot,
    provenance,
    training_samples,
)
from charaforge.selection.statistics import KEY
from charaforge.selection.usage import champion_card, export_champion
from charaforge.selection.wording import ReportContext

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
# What the report reads of each table (docs/data-contracts.md); the rest is optional.
_SCORE_COLUMNS = [*KEY, "image_id", "prompt_index", "prompt", "seed"]
_INDEX_COLUMNS = [*KEY, "image_id", "image_path", "prompt_index", "prompt", "seed"]


def _read_table(path: Path, stage: str, columns: list[str]) -> pd.DataFrame:
    require_stage_output(path, stage)
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise MissingInputError(
            f"{path}: unreadable ({error}); rerun the `{stage}` stage"
        ) from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise MissingInputError(f"{path}: lacks column(s) {missing}; rerun the `{stage}` stage")
    return table


def _read_json(path: Path, stage: str, required: bool = True) -> dict[str, Any] | None:
    if not required and not path.is_file():
        return None
    require_stage_output(path, stage)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MissingInputError(
            f"{path}: unreadable ({error}); rerun the `{stage}` stage"
        ) from None
    if not isinstance(data, dict):
        raise MissingInputError(f"{path}: not a JSON object; rerun the `{stage}` stage")
    return data


def _copy_threshold(scorers: dict[str, Any], scores: pd.DataFrame, path: Path) -> float | None:
    """The score stage's CLIP copy threshold (score.memorisation.copy_threshold), as it recorded
    it; required only when its scores have `nn_similarity` without the `memorised` verdict."""
    threshold = scorers.get("nn_similarity", {}).get("copy_threshold")
    if threshold is None and "nn_similarity" in scores and "memorised" not in scores:
        raise MissingInputError(
            f"{path}: nn_similarity records no copy_threshold; rerun the `score` stage"
        )
    return None if threshold is None else float(threshold)


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


def _metric(value: float) -> float | None:
    """A metrics.json number: six decimals, NaN as null."""
    value = float(value)
    return None if value != value else round(value, 6)


def _metrics_payload(context: ReportContext) -> dict[str, Any]:
    champion = context.selection.champion
    baseline = context.selection.baseline
    return {
        "champion": {
            "candidate": str(champion["candidate"]),
            "step": int(champion["step"]),
            "lora_scale": _metric(champion["lora_scale"]),
            **{metric: _metric(champion[metric]) for metric in context.metrics},
            "composite": _metric(champion["composite"]),
            "ci_low": _metric(champion["ci_low"]),
            "ci_high": _metric(champion["ci_high"]),
            "n_images": int(champion["n_images"]),
            "copy_fraction": _metric(champion["copy_fraction"]),
        },
        "baseline_composite": None
        if context.baseline_composite is None
        else _metric(context.baseline_composite),
        "champion_minus_baseline": None
        if baseline is None
        else {
            "difference": _metric(baseline.difference),
            "ci_low": _metric(baseline.ci_low),
            "ci_high": _metric(baseline.ci_high),
            "pairs": baseline.pairs,
            "verdict": baseline.verdict,
        },
        "statistical_tie": context.selection.statistical_tie,
        "stand_in": bool(context.stand_in),
        "confidence": context.config.confidence,
        "weights": {metric: _metric(weight) for metric, weight in context.weights.items()},
        "not_applicable": sorted(context.not_applicable),
        "rows_ranked": len(context.selection.table),
        "rows_memorising": int(context.selection.table["memorising"].sum()),
        "ground_truth": _ground_truth_payload(context),
    }


def _ground_truth_payload(context: ReportContext) -> dict[str, Any] | None:
    """The oracle's verdict on the champion and on the row it rates best (world models only)."""
    if context.ground_truth is None:
        return None
    table = context.ground_truth.table
    champion = context.selection.champion
    mine = context.ground_truth.row(champion["candidate"], champion["step"], champion["lora_scale"])
    best = table.sort_values("identity", ascending=False, kind="stable").iloc[0]

    def summary(row: pd.Series) -> dict[str, Any]:
        return {
            "candidate": str(row["candidate"]),
            "step": int(row["step"]),
            "lora_scale": _metric(row["lora_scale"]),
            "identity": _metric(row["identity"]),
            "identity_ci_low": _metric(row["identity_ci_low"]),
            "identity_ci_high": _metric(row["identity_ci_high"]),
            "character_right": _metric(row["character_right"]),
            "prompt_following": _metric(row["prompt_following"]),
        }

    return {"champion": summary(mine), "best_identity": summary(best)}


RANKING_FILE = "ranking.csv"  # every ranked row, as the report's ranking table shows it


def _ranking_csv(context: ReportContext) -> pd.DataFrame:
    """The ranking in machine-readable form: one row per candidate x step x scale."""
    table = context.selection.table
    columns = [
        "rank",
        *KEY,
        *context.metrics,
        "composite",
        "ci_low",
        "ci_high",
        "n_images",
        "copy_fraction",
        "memorising",
    ]
    frame = table.loc[:, columns].copy()
    champion = context.selection.champion
    frame["champion"] = (
        (frame["candidate"] == champion["candidate"])
        & (frame["step"] == champion["step"])
        & (frame["lora_scale"] == champion["lora_scale"])
    )
    return frame.round(6)


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
    character: str = "",
    trigger: str = "",
    data_dirs: DataDirs | None = None,
    experiment: str = "",
    mlflow_links: Callable[[Selection], MlflowLinks | None] | None = None,
    mlflow_ui: str = DEFAULT_UI,
) -> Selection:
    """Rank, choose the champion and write metrics.json, selection.md/.html, the plots and the
    champion's files with its model card (`champion/`).

    Image paths in the tables are relative to the repository root `root` (data-contracts.md);
    `data_dirs` (repository-relative) are the earlier stages' outputs the report summarises.
    `mlflow_links(selection)`, called once the champion is known and before the pages are
    written, gives the MLflow runs and model version the pages link to (`mlflow_ui`: the UI's
    address for the registry link). Every input is read and checked before anything is written.
    """
    score_dir, out_dir = Path(score_dir), Path(out_dir)
    scores = _read_table(score_dir / "scores.parquet", "score", _SCORE_COLUMNS)
    scorers = _read_json(score_dir / "scorers.json", "score")
    train_summary = _read_json(Path(train_dir) / "summary.json", "train")
    base_model = _read_json(Path(base_dir) / "model.json", "base", required=False)
    index = _read_table(Path(generate_dir) / "index.parquet", "generate", _INDEX_COLUMNS)
    metrics = [name for name in sorted(scorers) if name in scores.columns]
    applicable = {name: bool(scorers[name].get("applicable", True)) for name in metrics}
    copy_threshold = _copy_threshold(scorers, scores, score_dir / "scorers.json")

    weights = composite_metrics(config.weights, metrics, applicable)
    table = aggregate(scores, config, metrics, seed, applicable, copy_threshold)
    for name in table["candidate"].unique():
        if not _SAFE_NAME.match(str(name)):
            raise ConfigError(f"candidate name {name!r} cannot name a plot file")
    axes = pareto_axes(config, metrics, applicable)
    table["pareto"] = False if axes is None else pareto_front(table, *axes)
    selection = choose_champion(table, scores, weights, config, seed)
    stand_in = _stand_in_sources(scorers, train_summary, base_model)
    baseline = compare_with_baseline(scores, selection.champion, weights, config, seed)
    selection = replace(selection, stand_in=tuple(stand_in), baseline=baseline)
    links = None if mlflow_links is None else mlflow_links(selection)
    log.info(
        "champion %s step %d scale %g: composite %.4f%s",
        selection.champion["candidate"],
        selection.champion["step"],
        selection.champion["lora_scale"],
        selection.champion["composite"],
        " (statistical tie)" if selection.statistical_tie else "",
    )

    shown = [m for m in metrics if applicable[m]]
    context = ReportContext(
        config=config,
        selection=selection,
        metrics=shown,
        not_applicable={m: str(scorers[m].get("reason", "")) for m in metrics if not applicable[m]},
        weights=weights,
        scorers=scorers,
        train_summary=train_summary,
        stand_in=stand_in,
        baseline_composite=baseline_composite(table),
        pareto_axes=axes,
        copy_threshold=copy_threshold,
        breakdown=per_prompt_breakdown(scores, highlight_rows(table, selection.champion), weights),
        ground_truth=read_ground_truth(
            score_dir, selection.table, config.bootstrap_draws, config.confidence, seed
        ),
    )
    write_json(out_dir / "metrics.json", _metrics_payload(context))
    write_csv(out_dir / RANKING_FILE, _ranking_csv(context))
    dirs = data_dirs or DataDirs()
    card = champion_card(
        selection,
        index,
        train_dir,
        out_dir,
        trigger,
        character,
        config.registered_model,
        root,
        mlflow_ui,
    )
    by_step = best_scale_by_step(table, shown)
    with atomic_path(out_dir / "plots" / "score_by_step") as plots_dir:
        plots_dir.mkdir()
        for candidate, frame in by_step.items():
            write_csv(plots_dir / f"{candidate}.csv", frame)
    panels = ["composite", *[m for m in weights if m in shown]]
    step_png = plot_by_step(
        by_step, panels, context.baseline_composite, bool(stand_in), config.confidence
    )
    pareto_png = None
    if axes is not None:
        write_csv(out_dir / "plots" / "pareto.csv", pareto_table(table, axes))
        pareto_png = plot_pareto(selection, axes, bool(stand_in))
    thumbnails = Thumbnails(Path(root), config.thumbnail_size)
    sheets = [contact_sheet(index, scores, candidate, shown, thumbnails) for candidate in by_step]
    lora_candidates = [name for name in by_step if name != "base"]
    extras = ReportExtras(
        card=card,
        exported=export_champion(card, index, selection, base_model, root),
        loss_plot=loss_plot(train_dir, lora_candidates, bool(stand_in)),
        samples=training_samples(train_dir, lora_candidates, thumbnails, Path(root)),
        dataset=dataset_summary(dirs, Path(root), trigger),
        axes=axis_tables(scores, shown, config.bootstrap_draws, config.confidence, seed),
        mlflow=links,
        provenance=provenance(
            {
                "dataset": Path(root) / dirs.dataset / "metadata.parquet",
                "training summary": Path(train_dir) / "summary.json",
                "sweep index": Path(generate_dir) / "index.parquet",
                "scores": score_dir / "scores.parquet",
            },
            base_model,
            {
                "MLflow experiment": experiment or "(tracking off)",
                "MLflow registered model": f"{card.registry_uri} ({card.registry_link})",
            },
            Path(root),
        ),
    )
    # The same plots as PNG files: DVC shows image plots in `dvc plots show` offline.
    with atomic_path(out_dir / "plots" / "images") as images_dir:
        images_dir.mkdir()
        named = {"score_by_step": step_png, "pareto": pareto_png, "train_loss": extras.loss_plot}
        for name, png in named.items():
            if png is not None:
                (images_dir / f"{name}.png").write_bytes(png)
    write_text(out_dir / "selection.md", render_markdown(context, extras))
    write_text(
        out_dir / "selection.html", render_html(context, step_png, pareto_png, sheets, extras)
    )
    return selection
