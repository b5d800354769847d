"""The report's words and table cells, shared by its Markdown and HTML renderings.

Every sentence is plain text here; the templates place it (and the HTML one escapes it). Numbers
are printed with four decimals (`fmt`), a rounded -0.0 as 0.0 so a null value never reads
"-0.0000".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from charaforge.config import ReportConfig
from charaforge.selection.champion import Selection, selection_rule
from charaforge.selection.ground_truth import GroundTruth
from charaforge.selection.ranking import BASE_CANDIDATE, row_label
from charaforge.selection.statistics import MISSING_FILL


@dataclass(frozen=True)
class ReportContext:
    """Everything the report shows, computed before any rendering."""

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
    copy_threshold: float | None  # the score stage's CLIP copy threshold, when it recorded one
    breakdown: pd.DataFrame = field(default_factory=pd.DataFrame)
    ground_truth: GroundTruth | None = None  # the world's attribute oracle (world models only)


def fmt(value: float) -> str:
    value = float(value)
    # + 0.0 turns a rounded -0.0 into 0.0, so a null value never prints as "-0.0000".
    return "n/a" if np.isnan(value) else f"{round(value, 4) + 0.0:.4f}"


def baseline_sentence(context: ReportContext) -> str:
    comparison = context.selection.baseline
    if comparison is None:
        return "No baseline row (scale 0) in the sweep: the champion is not compared with the base."
    confidence = f"{context.config.confidence:.0%}"
    # + 0.0 turns a rounded -0.0 into 0.0, so a null difference never prints as "-0.0000".
    difference = round(comparison.difference, 4) + 0.0
    measured = (
        f"champion minus base model, paired on {comparison.pairs} (prompt, seed) pairs: "
        f"{difference:+.4f} ({confidence} CI {fmt(comparison.ci_low)} to "
        f"{fmt(comparison.ci_high)})"
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


def champion_sentence(context: ReportContext) -> str:
    champion = context.selection.champion
    confidence = f"{context.config.confidence:.0%}"
    text = (
        f"{champion['candidate']} at step {champion['step']}, "
        f"LoRA scale {champion['lora_scale']:g}: "
        f"composite {fmt(champion['composite'])} ({confidence} CI {fmt(champion['ci_low'])} to "
        f"{fmt(champion['ci_high'])}, n = {champion['n_images']} images), "
        + ", ".join(f"{metric} {fmt(champion[metric])}" for metric in context.metrics)
        + "."
    )
    if context.baseline_composite is not None:
        text += f" Baseline (base model, no LoRA): composite {fmt(context.baseline_composite)}."
    return text


def tie_sentence(context: ReportContext) -> str:
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
        f"{fmt(provisional['composite'])}); the rule below picks among them."
    )


def _copy_definition(context: ReportContext) -> str:
    """When an image counts as a copy, in the score stage's own words where it gave them."""
    criterion = context.scorers.get("memorised", {}).get("criterion")
    if criterion is not None:
        return f"an image counts as a copy of a training image when {criterion}"
    if context.copy_threshold is not None:
        return (
            "an image counts as a copy of a training image when its CLIP cosine with a training "
            f"image is at least {context.copy_threshold:g}"
        )
    return "no memorisation scorer ran, so no image counts as a copy of a training image"


def memorisation_sentence(context: ReportContext) -> str:
    table = context.selection.table
    memorising = table[table["memorising"]]
    text = (
        f"Memorisation guard: {_copy_definition(context)}; "
        f"a row with more than {context.config.max_copy_fraction:.0%} copies is ineligible."
    )
    if memorising.empty:
        return text + " No row memorises its training set."
    labels = ", ".join(row_label(row) for _, row in memorising.iterrows())
    return text + f" Ineligible for memorising: {labels}."


def banner(context: ReportContext) -> str:
    return (
        "Computed with stand-in models (" + ", ".join(context.stand_in) + "): random weights built "
        "from a seed. These numbers exercise the pipeline; they say nothing about image quality."
    )


def composite_sentence(context: ReportContext) -> str:
    formula = " + ".join(f"{weight:.3g} x {metric}" for metric, weight in context.weights.items())
    text = (
        f"Composite = {formula} (report.weights of the applicable metrics, normalised "
        "to sum(|w|) = 1; each metric is averaged over the images that have it, a row with no "
        f"value scores {MISSING_FILL:g}); the CI is a percentile bootstrap over the row's "
        f"(prompt, seed) images ({context.config.bootstrap_draws} seeded resamples)."
    )
    dropped = sorted(set(context.config.weights) - set(context.weights))
    if dropped:
        text += f" Weighted but not applicable, so left out: {', '.join(dropped)}."
    return text


def rule_sentence(context: ReportContext) -> str:
    return selection_rule(context.config)


def scorer_lines(context: ReportContext) -> list[str]:
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
                f"generated size): {fmt(ceiling.get(name, float('nan')))}"
            )
        if info.get("defining_tags"):
            line += f"; defining tags: {', '.join(info['defining_tags'])}"
        if "images_without_face" in info:
            line += f"; images without a face: {info['images_without_face']}"
        lines.append(line)
    for name, reason in sorted(context.not_applicable.items()):
        lines.append(f"{name}: not applicable ({reason or 'no data'})")
    return lines


def candidate_lines(context: ReportContext) -> list[str]:
    lines = []
    for candidate in context.train_summary.get("candidates", []):
        lines.append(
            f"{candidate.get('name')}: rank {candidate.get('rank')}, "
            f"alpha {candidate.get('alpha')}, learning rate {candidate.get('learning_rate')}, "
            f"checkpoints {candidate.get('checkpoints')}, "
            f"final loss {candidate.get('final_loss')}"
        )
    return lines


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


def ranking_header(context: ReportContext) -> list[str]:
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


def ranking_rows(context: ReportContext) -> list[list[str]]:
    """One row of cells per ranked row; the last cell (the note) is also the HTML row's class."""
    champion = context.selection.champion
    rows = []
    for row in context.selection.table.itertuples():
        rows.append(
            [
                str(row.rank),
                str(row.candidate),
                str(row.step),
                f"{row.lora_scale:g}",
                *[fmt(getattr(row, metric)) for metric in context.metrics],
                fmt(row.composite),
                f"{fmt(row.ci_low)} to {fmt(row.ci_high)}",
                str(row.n_images),
                f"{row.copy_fraction:.0%}",
                _note(row, champion),
            ]
        )
    return rows


def breakdown_table(context: ReportContext) -> tuple[list[str], list[list[str]]]:
    frame = context.breakdown
    labels = [column for column in frame.columns if column not in ("prompt_index", "prompt")]
    rows = [
        [f"#{row['prompt_index']}: {row['prompt']}", *[fmt(row[label]) for label in labels]]
        for _, row in frame.iterrows()
    ]
    return ["prompt", *labels], rows


GROUND_TRUTH_INTRO = (
    "What the world's attribute oracle sees in the same images. The oracle is a classifier "
    "trained apart from every scorer on the world's renders; it is never part of the composite "
    "or the selection, and it exists only for the world models, whose attributes are known. "
    "Identity: share of the character's attributes drawn right; character right: share of "
    "images with all of them right; prompt-following: share of the prompted context (the "
    "background) drawn right. Rows in ranking order."
)


def ground_truth_table(context: ReportContext) -> tuple[list[str], list[list[str]]] | None:
    """The oracle's summary per ranking row (header, rows), or None without an oracle."""
    if context.ground_truth is None:
        return None
    champion = context.selection.champion
    confidence = f"{context.config.confidence:.0%} CI"
    rows = []
    for ranked in context.selection.table.itertuples():
        truth = context.ground_truth.row(ranked.candidate, ranked.step, ranked.lora_scale)
        rows.append(
            [
                str(ranked.rank),
                str(ranked.candidate),
                str(ranked.step),
                f"{ranked.lora_scale:g}",
                fmt(truth["identity"]),
                f"{fmt(truth['identity_ci_low'])} to {fmt(truth['identity_ci_high'])}",
                fmt(truth["character_right"]),
                fmt(truth["prompt_following"]),
                str(int(truth["n_images"])),
                _note(ranked, champion),
            ]
        )
    header = [
        "rank",
        "candidate",
        "step",
        "LoRA scale",
        "oracle identity",
        confidence,
        "character right",
        "prompt-following",
        "n",
        "note",
    ]
    return header, rows
