"""Model selection: rank candidate x checkpoint x LoRA scale, name the champion, write the report.

Each (candidate, step, lora_scale) row aggregates its (prompt, seed) images: mean CLIP-I, mean
CLIP-T, and the composite sum(weight * metric) with a seeded bootstrap confidence interval. With a
handful of prompts and seeds per row, neighbouring rows are often within noise of each other, so
the champion is chosen by a stated rule (SELECTION_RULE) instead of by the top mean alone.

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
from dataclasses import dataclass, replace
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
SELECTION_RULE = (
    "The LoRA-bearing row (LoRA scale > 0) with the highest mean composite is the provisional "
    "champion. Every LoRA-bearing row whose {confidence:.0%} bootstrap confidence interval "
    "overlaps the provisional champion's is a statistical tie with it; among the tied rows the "
    "champion is "
    "the one with the smallest LoRA scale, then the earliest step, then the higher mean composite, "
    'then the candidate name in alphabetical order. The base model row (candidate "base", no '
    "LoRA) is the baseline and is never the champion."
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class Selection:
    """The ranked table and the champion chosen from it."""

    table: pd.DataFrame  # one row per (candidate, step, lora_scale), ranked
    champion: pd.Series
    provisional: pd.Series  # the top LoRA row by mean composite
    tied: pd.DataFrame  # LoRA rows statistically tied with the provisional champion (itself too)
    stand_in: tuple[str, ...] = ()  # what was a stand-in model (empty: all real weights)

    @property
    def statistical_tie(self) -> bool:
        return len(self.tied) > 1


def composite_scores(
    scores: pd.DataFrame, weights: dict[str, float], metrics: list[str]
) -> pd.Series:
    """Per image: sum(weight * metric); a weight naming no produced metric is a config error."""
    unknown = sorted(set(weights) - set(metrics))
    if unknown:
        raise ConfigError(
            f"report.weights: unknown metric(s) {unknown}; the score stage produced: "
            f"{', '.join(metrics)}"
        )
    composite = pd.Series(0.0, index=scores.index)
    for metric in sorted(weights):
        composite = composite + weights[metric] * scores[metric].astype("float64")
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


def aggregate(
    scores: pd.DataFrame, config: ReportConfig, metrics: list[str], seed: int
) -> pd.DataFrame:
    """One ranked row per (candidate, step, lora_scale) with means, composite and its CI."""
    scores = scores.assign(composite=composite_scores(scores, config.weights, metrics))
    rows = []
    for key, group in scores.groupby(KEY, sort=True):
        candidate, step, lora_scale = key
        # Sorted so that the resample does not depend on the order the sweep listed its images.
        group = group.sort_values(["prompt_index", "seed", "image_id"])
        group_seed = derive_seed(seed, "report.bootstrap", candidate, int(step), float(lora_scale))
        low, high = bootstrap_ci(
            group["composite"].to_numpy(), config.bootstrap_draws, config.confidence, group_seed
        )
        row = {"candidate": candidate, "step": int(step), "lora_scale": float(lora_scale)}
        row.update({metric: float(group[metric].mean()) for metric in metrics})
        row.update(
            composite=float(group["composite"].mean()),
            ci_low=low,
            ci_high=high,
            n_images=len(group),
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.sort_values(
        ["composite", "lora_scale", "step", "candidate"], ascending=[False, True, True, True]
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def choose_champion(table: pd.DataFrame) -> Selection:
    """Apply SELECTION_RULE to a ranked table."""
    lora_rows = table[(table["lora_scale"] > 0) & (table["candidate"] != BASE_CANDIDATE)]
    if lora_rows.empty:
        raise ValueError("no LoRA-bearing rows (lora_scale > 0) to choose a champion from")
    provisional = lora_rows.iloc[0]  # the table is ranked by composite
    overlaps = (lora_rows["ci_low"] <= provisional["ci_high"]) & (
        provisional["ci_low"] <= lora_rows["ci_high"]
    )
    tied = lora_rows[overlaps].sort_values(
        ["lora_scale", "step", "composite", "candidate"], ascending=[True, True, False, True]
    )
    return Selection(table=table, champion=tied.iloc[0], provisional=provisional, tied=tied)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _stand_in_sources(
    scorers: dict[str, Any], train_summary: dict[str, Any], base_model: dict[str, Any] | None
) -> list[str]:
    sources = [
        f"scorer {name} ({info.get('model')})"
        for name, info in sorted(scorers.items())
        if info.get("stand_in")
    ]
    if base_model is not None and base_model.get("stand_in"):
        sources.append("base model")
    elif base_model is None and train_summary.get("stand_in"):
        sources.append("base model (per the training summary)")
    return sources


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
    """Rank, choose the champion and write metrics.json, selection.md/.html and the step plots.

    Image paths in the tables are relative to the repository root `root` (data-contracts.md).
    """
    score_dir, out_dir = Path(score_dir), Path(out_dir)
    scores = pd.read_parquet(score_dir / "scores.parquet")
    scorers = _read_json(score_dir / "scorers.json")
    if scorers is None:
        raise FileNotFoundError(f"{score_dir}/scorers.json not found (run the score stage)")
    metrics = [name for name in sorted(scorers) if name in scores.columns]
    train_summary = _read_json(Path(train_dir) / "summary.json")
    if train_summary is None:
        raise FileNotFoundError(f"{train_dir}/summary.json not found (run the train stage)")
    base_model = _read_json(Path(base_dir) / "model.json")
    index = pd.read_parquet(Path(generate_dir) / "index.parquet")

    table = aggregate(scores, config, metrics, seed)
    for name in table["candidate"].unique():
        if not _SAFE_NAME.match(str(name)):
            raise ValueError(f"candidate name {name!r} cannot name a plot file")
    selection = choose_champion(table)
    stand_in = _stand_in_sources(scorers, train_summary, base_model)
    selection = replace(selection, stand_in=tuple(stand_in))
    baseline = table[table["candidate"] == BASE_CANDIDATE]
    baseline_composite = float(baseline["composite"].iloc[0]) if len(baseline) else None
    log.info(
        "champion %s step %d scale %g: composite %.4f%s",
        selection.champion["candidate"],
        selection.champion["step"],
        selection.champion["lora_scale"],
        selection.champion["composite"],
        " (statistical tie)" if selection.statistical_tie else "",
    )

    context = _Context(
        config=config,
        selection=selection,
        metrics=metrics,
        scorers=scorers,
        train_summary=train_summary,
        stand_in=stand_in,
        baseline_composite=baseline_composite,
    )
    write_json(out_dir / "metrics.json", _metrics_payload(context))
    write_text(out_dir / "selection.md", _markdown(context))
    by_step = _best_scale_by_step(table, metrics)
    with atomic_path(out_dir / "plots" / "score_by_step") as plots_dir:
        plots_dir.mkdir()
        for candidate, frame in by_step.items():
            write_csv(plots_dir / f"{candidate}.csv", frame)
    plot_png = _plot_by_step(by_step, metrics, baseline_composite, bool(stand_in))
    thumbnails = _Thumbnails(Path(root), config.thumbnail_size)
    sheets = {
        candidate: _contact_sheet(index, scores, candidate, metrics, thumbnails)
        for candidate in by_step
    }
    write_text(out_dir / "selection.html", _html(context, plot_png, sheets))
    return selection


@dataclass(frozen=True)
class _Context:
    config: ReportConfig
    selection: Selection
    metrics: list[str]
    scorers: dict[str, Any]
    train_summary: dict[str, Any]
    stand_in: list[str]
    baseline_composite: float | None


def _r(value: float) -> float:
    return round(float(value), 6)


def _metrics_payload(context: _Context) -> dict[str, Any]:
    champion = context.selection.champion
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
        },
        "baseline_composite": None
        if context.baseline_composite is None
        else _r(context.baseline_composite),
        "statistical_tie": context.selection.statistical_tie,
        "stand_in": bool(context.stand_in),
        "confidence": context.config.confidence,
        "weights": dict(sorted(context.config.weights.items())),
        "rows_ranked": len(context.selection.table),
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


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _plot_by_step(
    by_step: dict[str, pd.DataFrame], metrics: list[str], baseline: float | None, stand_in: bool
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["composite", *metrics]
    # rc_context pins what could differ between machines; metadata drops the Software/version
    # text chunk so that the PNG bytes depend on the data only.
    with plt.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "cf"}):
        figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), dpi=100)
        for axis, panel in zip(np.atleast_1d(axes), panels, strict=True):
            for candidate, frame in by_step.items():
                if panel == "composite":
                    error = [
                        frame["composite"] - frame["ci_low"],
                        frame["ci_high"] - frame["composite"],
                    ]
                    axis.errorbar(
                        frame["step"],
                        frame[panel],
                        yerr=error,
                        marker="o",
                        capsize=3,
                        label=candidate,
                    )
                else:
                    axis.plot(frame["step"], frame[panel], marker="o", label=candidate)
            if panel == "composite" and baseline is not None:
                axis.axhline(baseline, color="grey", linestyle="--", label="base (no LoRA)")
            axis.set_xlabel("step")
            axis.set_title(
                "composite at each step's best LoRA scale (95% CI)"
                if panel == "composite"
                else f"{panel} at that scale"
            )
            axis.grid(alpha=0.3)
        np.atleast_1d(axes)[0].legend(fontsize=7)
        if stand_in:
            figure.suptitle("computed with stand-in models (random weights)", color="#a05000")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
        plt.close(figure)
    return buffer.getvalue()


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
    return f"{value:.4f}"


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
        # + 0.0 turns a rounded -0.0 into 0.0, so a null difference never prints as "-0.0000".
        delta = round(champion["composite"] - context.baseline_composite, 4) + 0.0
        text += (
            f" Baseline (base model, no LoRA): composite {_fmt(context.baseline_composite)} "
            f"(champion {delta:+.4f})."
        )
    return text


def _tie_sentence(context: _Context) -> str:
    selection = context.selection
    if not selection.statistical_tie:
        return (
            "No statistical tie: no other LoRA row's confidence interval overlaps the champion's."
        )
    provisional = selection.provisional
    others = len(selection.tied) - 1
    return (
        f"Statistical tie: {others} other LoRA row(s) have confidence intervals overlapping "
        f"that of the top mean composite ({provisional['candidate']} step "
        f"{provisional['step']} scale {provisional['lora_scale']:g}, "
        f"{_fmt(provisional['composite'])}); the rule below picks among them."
    )


def _ranking_rows(context: _Context) -> list[list[str]]:
    champion = context.selection.champion
    rows = []
    for row in context.selection.table.itertuples():
        is_champion = (row.candidate, row.step, row.lora_scale) == (
            champion["candidate"],
            champion["step"],
            champion["lora_scale"],
        )
        note = (
            "champion" if is_champion else ("baseline" if row.candidate == BASE_CANDIDATE else "")
        )
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
                note,
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
        "note",
    ]


def _banner(context: _Context) -> str:
    return (
        "Computed with stand-in models (" + ", ".join(context.stand_in) + "): random weights built "
        "from a seed. These numbers exercise the pipeline; they say nothing about image quality."
    )


def _formula(context: _Context) -> str:
    return " + ".join(
        f"{weight:g} x {metric}" for metric, weight in sorted(context.config.weights.items())
    )


def _composite_sentence(context: _Context) -> str:
    return (
        f"Composite = {_formula(context)}; the CI is a percentile bootstrap of the mean over the "
        f"row's (prompt, seed) images ({context.config.bootstrap_draws} seeded resamples)."
    )


def _scorer_lines(context: _Context) -> list[str]:
    lines = []
    for name in context.metrics:
        info = context.scorers[name]
        stand_in = ", stand-in" if info.get("stand_in") else ""
        lines.append(
            f"{name}: {info.get('model')} ({info.get('scale')}{stand_in}); "
            f"{info.get('definition', '')}"
        )
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


def _markdown(context: _Context) -> str:
    parts = [f"# {context.config.title}", ""]
    if context.stand_in:
        parts += [f"> **{_banner(context)}**", ""]
    parts += ["## Champion", "", _champion_sentence(context), "", _tie_sentence(context), ""]
    parts += [
        "## Selection rule",
        "",
        SELECTION_RULE.format(confidence=context.config.confidence),
        "",
    ]
    parts += [_composite_sentence(context), ""]
    header = _ranking_header(context)
    parts += ["## Ranking", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    parts += ["| " + " | ".join(row) + " |" for row in _ranking_rows(context)]
    parts += ["", "## Scorers", ""] + [f"- {line}" for line in _scorer_lines(context)]
    parts += ["", "## Candidates", ""] + [f"- {line}" for line in _candidate_lines(context)]
    parts += ["", "Images, contact sheets and the score-versus-step plot: selection.html.", ""]
    return "\n".join(parts)


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em 1em; font-weight: bold; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; font-size: 0.85em; text-align: left; }
tr.champion { background: #d4edda; font-weight: bold; }
tr.baseline { background: #eee; }
table.sheet img { image-rendering: pixelated; margin: 1px; vertical-align: top; }
th.prompt { max-width: 14em; font-weight: normal; }
.missing { color: #a00; font-size: 0.8em; }
"""


def _html(context: _Context, plot_png: bytes, sheets: dict[str, str]) -> str:
    esc = html.escape
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
        f"<p>{esc(_tie_sentence(context))}</p>",
        "<h2>Selection rule</h2>",
        f"<p>{esc(SELECTION_RULE.format(confidence=context.config.confidence))}</p>",
        f"<p>{esc(_composite_sentence(context))}</p>",
        "<h2>Ranking</h2>",
        "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in _ranking_header(context)) + "</tr>",
    ]
    for row in _ranking_rows(context):
        css = f' class="{row[-1]}"' if row[-1] else ""
        parts.append(f"<tr{css}>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>")
    parts += [
        "</table>",
        "<h2>Score versus step</h2>",
        f'<img src="{_png_data_uri(plot_png)}" alt="composite, CLIP-I and CLIP-T versus step">',
        "<h2>Scorers</h2><ul>",
        *[f"<li>{esc(line)}</li>" for line in _scorer_lines(context)],
        "</ul><h2>Candidates</h2><ul>",
        *[f"<li>{esc(line)}</li>" for line in _candidate_lines(context)],
        "</ul><h2>Contact sheets</h2>",
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
