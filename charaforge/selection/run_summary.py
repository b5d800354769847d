"""The report's account of the run behind the ranking: training and validation loss curves, the
training samples, the dataset (counts, quarantine list, dedupe contact sheet) and provenance.

Every input here is optional: a section whose stage output is absent says so instead of failing
(the ranking does not depend on it). Images are PNG data URIs, plots byte-deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from charaforge.core.files import sha256_file
from charaforge.selection.plots import PLOT_RC, Thumbnails, figure_png, png_data_uri, pyplot
from charaforge.selection.usage import relative_to_root


@dataclass(frozen=True)
class DataDirs:
    """Where the report finds the earlier stages' outputs (repository-relative by default)."""

    dataset: Path = Path("data/dataset")
    ingest: Path = Path("data/ingest")
    dedupe: Path = Path("data/dedupe")


@dataclass(frozen=True)
class SampleRow:
    candidate: str
    step: int
    images: list[tuple[str, str]]  # (data URI, label)


@dataclass(frozen=True)
class DatasetSummary:
    counts: list[tuple[str, str]]
    quarantine: list[tuple[str, str, str]]  # source, kind, reason
    contact_sheet: str | None  # data URI of the dedupe contact sheet
    card: str | None  # path of the dataset card


def _history(train_dir: Path, candidate: str) -> pd.DataFrame | None:
    path = train_dir / candidate / "history.csv"
    return pd.read_csv(path) if path.is_file() else None


def loss_plot(train_dir: str | Path, candidates: list[str], stand_in: bool) -> bytes | None:
    """Training loss (per step) and validation loss (at each checkpoint) of every candidate."""
    train_dir = Path(train_dir)
    histories = {name: _history(train_dir, name) for name in candidates}
    histories = {name: frame for name, frame in histories.items() if frame is not None}
    if not histories:
        return None
    plt = pyplot()
    with plt.rc_context(PLOT_RC):
        figure, (train_axis, val_axis) = plt.subplots(1, 2, figsize=(9.6, 3.4), dpi=100)
        for name, frame in sorted(histories.items()):
            line = train_axis.plot(frame["step"], frame["loss"], label=name, linewidth=1)[0]
            if "val_loss" in frame:
                val = frame.dropna(subset=["val_loss"])
                val_axis.plot(val["step"], val["val_loss"], marker="o", color=line.get_color())
        suffix = " (stand-in models)" if stand_in else ""
        train_axis.set(title=f"training loss{suffix}", xlabel="step", ylabel="loss")
        val_axis.set(title=f"validation loss{suffix}", xlabel="step", ylabel="loss")
        train_axis.legend(fontsize=7)
        figure.tight_layout()
        return figure_png(figure)


def training_samples(
    train_dir: str | Path, candidates: list[str], thumbnails: Thumbnails, root: Path
) -> list[SampleRow]:
    """Each candidate's validation samples, one row per checkpoint (samples/step-NNNNNN/)."""
    rows = []
    for candidate in candidates:
        samples = Path(train_dir) / candidate / "samples"
        if not samples.is_dir():
            continue
        for folder in sorted(samples.glob("step-*")):
            images = []
            for image in sorted(folder.glob("*.png")):
                uri = thumbnails(image.relative_to(root).as_posix())
                if uri is not None:
                    images.append((uri, f"{candidate} {folder.name} {image.stem}"))
            rows.append(SampleRow(candidate, int(folder.name.removeprefix("step-")), images))
    return rows


def dataset_summary(dirs: DataDirs, root: Path, trigger: str) -> DatasetSummary | None:
    """Counts, the quarantine list and the dedupe contact sheet; None without a dataset."""
    metadata = root / dirs.dataset / "metadata.parquet"
    if not metadata.is_file():
        return None
    table = pd.read_parquet(metadata)
    splits = table["split"].value_counts().to_dict()
    counts = [
        ("images in the dataset", str(len(table))),
        ("train / val", f"{splits.get('train', 0)} / {splits.get('val', 0)}"),
        ("without tags", str(int((table["tags"].map(len) == 0).sum()))),
        ("captioned with the trigger word alone", str(int((table["caption"] == trigger).sum()))),
    ]
    summary_path = root / dirs.ingest / "summary.json"
    if summary_path.is_file():
        ingest = json.loads(summary_path.read_text(encoding="utf-8"))
        counts.insert(0, ("source files quarantined by ingest", str(ingest.get("quarantined", 0))))
    dedupe = root / dirs.dedupe / "dedupe.parquet"
    if dedupe.is_file():
        dropped = int((~pd.read_parquet(dedupe, columns=["keep"])["keep"]).sum())
        counts.insert(1, ("dropped as (near-)duplicates", str(dropped)))
    quarantine_path = root / dirs.ingest / "quarantine.parquet"
    quarantine = []
    if quarantine_path.is_file():
        frame = pd.read_parquet(quarantine_path)
        quarantine = [(str(r.source_path), str(r.kind), str(r.reason)) for r in frame.itertuples()]
    sheet = root / dirs.dedupe / "contact_sheet.png"
    card = root / dirs.dataset / "README.md"
    return DatasetSummary(
        counts=counts,
        quarantine=quarantine,
        contact_sheet=png_data_uri(sheet.read_bytes()) if sheet.is_file() else None,
        card=(dirs.dataset / "README.md").as_posix() if card.is_file() else None,
    )


def provenance(
    paths: dict[str, Path],
    base_model: dict[str, Any] | None,
    extra: dict[str, str],
    root: Path,
) -> list[tuple[str, str]]:
    """What the ranking was computed from: input hashes, the base model, the registry names."""
    lines = []
    if base_model is not None:
        source = base_model.get("path") or base_model.get("source")
        lines.append(("base model", f"{base_model.get('family')} {source}"))
    for label, path in paths.items():
        if path.is_file():
            shown = relative_to_root(path, root)
            lines.append((label, f"{shown} sha256 {sha256_file(path)[:16]}"))
    lines += list(extra.items())
    return lines
