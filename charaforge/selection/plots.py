"""The report's pictures: score-versus-step and Pareto plots (PNG bytes), and contact sheets of
downscaled sweep images (PNG data URIs), each byte-deterministic."""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from charaforge.selection.champion import Selection
from charaforge.selection.ranking import BASE_CANDIDATE

log = logging.getLogger(__name__)

# rc_context pins what could differ between machines (font, size, the SVG hash salt).
PLOT_RC = {"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "cf"}
STAND_IN_TITLE = "computed with stand-in models (random weights)"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # metadata drops the Software/version text chunk so that the bytes depend on the data only.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    pyplot().close(figure)
    return buffer.getvalue()


def plot_by_step(
    by_step: dict[str, pd.DataFrame],
    panels: list[str],
    baseline: float | None,
    stand_in: bool,
    confidence: float,
) -> bytes:
    """One panel per metric: each candidate's value at its best scale, against the step."""
    plt = pyplot()
    with plt.rc_context(PLOT_RC):
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
                f"composite at each step's best scale ({confidence:.0%} CI)"
                if panel == "composite"
                else f"{panel} at that scale"
            )
            axis.grid(alpha=0.3)
        axes.ravel()[0].legend(fontsize=7)
        if stand_in:
            figure.suptitle(STAND_IN_TITLE, color="#a05000")
        figure.tight_layout()
        return figure_png(figure)


def plot_pareto(selection: Selection, axes: tuple[str, str], stand_in: bool) -> bytes:
    """Identity against prompt alignment, one point per row; front, memorisers, champion marked."""
    plt = pyplot()
    table, champion = selection.table, selection.champion
    x, y = axes
    with plt.rc_context(PLOT_RC):
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
        if stand_in:
            figure.suptitle(STAND_IN_TITLE, color="#a05000")
        figure.tight_layout()
        return figure_png(figure)


class Thumbnails:
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
        return png_data_uri(buffer.getvalue())


@dataclass(frozen=True)
class SheetImage:
    uri: str | None  # None: the image file is missing
    label: str  # seed and scores, the image's alt text and tooltip


@dataclass(frozen=True)
class SheetColumn:
    is_lora: bool
    step: int
    lora_scale: str  # formatted with :g


@dataclass(frozen=True)
class SheetRow:
    prompt: str
    cells: list[list[SheetImage]]  # one list of images (the seeds) per column
    prompt_index: int = 0
    suite: str = ""  # the CharaConsist suite the prompt comes from ("" for eval.prompts)


@dataclass(frozen=True)
class ContactSheet:
    """Rows are prompts, columns base then step x scale, each cell its seeds' images."""

    candidate: str
    thumbnail_size: int
    columns: list[SheetColumn]
    rows: list[SheetRow]


def contact_sheet(
    index: pd.DataFrame,
    scores: pd.DataFrame,
    candidate: str,
    metrics: list[str],
    thumbnails: Thumbnails,
) -> ContactSheet:
    """The contact sheet of one candidate beside the base model, from the sweep's index."""
    by_image = scores.drop_duplicates("image_id").set_index("image_id")
    rows = index[index["candidate"].isin([candidate, BASE_CANDIDATE])]
    columns = (
        rows.loc[:, ["candidate", "step", "lora_scale"]]
        .drop_duplicates()
        .assign(is_lora=lambda frame: frame["candidate"] != BASE_CANDIDATE)
        .sort_values(["is_lora", "step", "lora_scale"])
    )
    labels = ["prompt_index", "prompt", *(["suite"] if "suite" in rows.columns else [])]
    prompts = rows.loc[:, labels].drop_duplicates("prompt_index").sort_values("prompt_index")
    sheet_rows = []
    for prompt in prompts.itertuples():
        cells = []
        for column in columns.itertuples():
            images = rows[
                (rows["prompt_index"] == prompt.prompt_index)
                & (rows["candidate"] == column.candidate)
                & (rows["step"] == column.step)
                & (rows["lora_scale"] == column.lora_scale)
            ].sort_values("seed")
            cell = []
            for image in images.itertuples():
                label = f"seed {image.seed}"
                if image.image_id in by_image.index:
                    scored = by_image.loc[image.image_id]
                    label += ": " + ", ".join(f"{m} {scored[m]:.3f}" for m in metrics)
                cell.append(SheetImage(thumbnails(image.image_path), label))
            cells.append(cell)
        suite = getattr(prompt, "suite", "")
        suite = suite if isinstance(suite, str) else ""  # None / NaN: not from a suite
        sheet_rows.append(SheetRow(str(prompt.prompt), cells, int(prompt.prompt_index), suite))
    sheet_columns = [
        SheetColumn(bool(c.is_lora), c.step, f"{c.lora_scale:g}") for c in columns.itertuples()
    ]
    return ContactSheet(candidate, thumbnails.size, sheet_columns, sheet_rows)
