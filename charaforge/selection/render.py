"""Render the report: the Markdown and HTML pages from Jinja2 templates (`templates/`).

Both templates read the same document context (`document_context`): the words of `wording`, the
plots and contact sheets of `plots`. Each section of a page is a named template block; a new
section is a block in both templates plus one entry here.

HTML escaping is the standard library's `html.escape` (quotes as `&quot;` / `&#x27;`), applied by
the environment's `finalize` to every `{{ value }}`, rather than Jinja's own autoescape (which
writes `&#34;` / `&#39;`): the report's bytes are a DVC output and stay those of earlier runs.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from charaforge.selection import wording
from charaforge.selection.axes import AxisTable
from charaforge.selection.mlflow_links import MlflowLinks
from charaforge.selection.plots import ContactSheet, png_data_uri
from charaforge.selection.run_summary import DatasetSummary, SampleRow
from charaforge.selection.usage import ChampionCard
from charaforge.selection.wording import ReportContext

# The ranking's deciding columns, shown first and alone (the rest in a collapsible table).
DECIDING = ("rank", "candidate", "step", "LoRA scale", "composite", "CI", "note")


@dataclass(frozen=True)
class ReportExtras:
    """What the report shows beside the ranking: the champion card and the run behind it."""

    card: ChampionCard | None = None
    exported: bool = False  # the champion's files are in reports/champion/
    loss_plot: bytes | None = None
    samples: list[SampleRow] = field(default_factory=list)
    dataset: DatasetSummary | None = None
    provenance: list[tuple[str, str]] = field(default_factory=list)
    # Condition axes (suite methods, control types) scored side by side (selection.axes).
    axes: list[AxisTable] = field(default_factory=list)
    mlflow: MlflowLinks | None = None  # the runs and model version behind the report


def compact_ranking(header: list[str], rows: list[list[str]]) -> dict[str, Any]:
    """The deciding columns of the ranking (a column counts when its name starts with one)."""
    keep = [
        i
        for i, name in enumerate(header)
        if any(name.startswith(d) or name.endswith(d) for d in DECIDING)
    ]
    return {"header": [header[i] for i in keep], "rows": [[row[i] for i in keep] for row in rows]}


def _escape_html(value: Any) -> Markup:
    # Markup (a macro's output) is already HTML; anything else is text.
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value)))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _environment(autoescape: bool) -> Environment:
    environment = Environment(
        loader=PackageLoader("charaforge.selection", "templates"),
        autoescape=autoescape,
        finalize=_escape_html if autoescape else None,
        undefined=StrictUndefined,  # a misspelt context entry is an error, not an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["md_cell"] = _md_cell
    return environment


_MARKDOWN = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


def document_context(context: ReportContext, extras: ReportExtras | None = None) -> dict[str, Any]:
    """What both pages show, as text: one entry per template variable."""
    extras = extras or ReportExtras()
    ranking_rows = wording.ranking_rows(context)
    ranking_header = wording.ranking_header(context)
    breakdown_header, breakdown_rows = wording.breakdown_table(context)
    truth = wording.ground_truth_table(context)
    return {
        "title": context.config.title,
        "banner": wording.banner(context) if context.stand_in else None,
        "champion": wording.champion_sentence(context),
        "baseline": wording.baseline_sentence(context),
        "tie": wording.tie_sentence(context),
        "warnings": list(context.selection.warnings),
        "rule": wording.rule_sentence(context),
        "composite": wording.composite_sentence(context),
        "memorisation": wording.memorisation_sentence(context),
        "ranking": {
            "header": ranking_header,
            "rows": ranking_rows,
            "classes": [row[-1] for row in ranking_rows],  # the note names the row's CSS class
            "compact": compact_ranking(ranking_header, ranking_rows),
        },
        "card": extras.card,
        "exported": extras.exported,
        "dataset": extras.dataset,
        "provenance": extras.provenance,
        "axes": extras.axes,
        "mlflow": extras.mlflow,
        "breakdown": {"header": breakdown_header, "rows": breakdown_rows},
        "scorers": wording.scorer_lines(context),
        "candidates": wording.candidate_lines(context),
        "stand_in_note": " (stand-in models)" if context.stand_in else "",
        "ground_truth": None
        if truth is None
        else {"intro": wording.GROUND_TRUTH_INTRO, "header": truth[0], "rows": truth[1]},
    }


def render_markdown(context: ReportContext, extras: ReportExtras | None = None) -> str:
    return _MARKDOWN.get_template("selection.md.j2").render(document_context(context, extras))


def render_html(
    context: ReportContext,
    step_png: bytes,
    pareto_png: bytes | None,
    sheets: list[ContactSheet],
    extras: ReportExtras | None = None,
) -> str:
    pareto = None
    if pareto_png is not None and context.pareto_axes is not None:
        identity, alignment = context.pareto_axes
        pareto = {"identity": identity, "alignment": alignment, "plot": png_data_uri(pareto_png)}
    extras = extras or ReportExtras()
    return _HTML.get_template("selection.html.j2").render(
        document_context(context, extras),
        step_plot=png_data_uri(step_png),
        pareto=pareto,
        sheets=sheets,
        loss_plot=None if extras.loss_plot is None else png_data_uri(extras.loss_plot),
        samples=extras.samples,
    )
