"""Tagging of the kept images behind a small `Tagger` protocol.

A tagger turns one image (its pixels and/or its sidecar caption) into tags with scores. The
`sidecar` backend reads the kohya-style `.txt` caption that came with the image; model backends
(WD14 ONNX, CLIP zero-shot) implement the same protocol and register in `build_tagger`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pandas as pd

from charaforge.config import TaggerConfig
from charaforge.dedupe import kept_rows
from charaforge.io import write_parquet

log = logging.getLogger(__name__)

TAG_COLUMNS = ["image_id", "tags", "scores", "tagger"]


@dataclass(frozen=True)
class TagRequest:
    """Everything a tagger may look at for one image."""

    image_id: str
    image_path: str  # the normalised RGB PNG written by ingest
    sidecar_text: str | None  # the caption that came with the source file, if any


@dataclass(frozen=True)
class TagResult:
    tags: list[str]
    scores: list[float]


class Tagger(Protocol):
    name: str

    def tag(self, request: TagRequest) -> TagResult: ...


def parse_sidecar(text: str | None) -> list[str]:
    """Comma-separated tags: stripped, lower-cased, empty ones dropped, first occurrence kept.

    Newlines separate tags too: some captions put one tag per line.
    """
    if not text:
        return []
    seen: dict[str, None] = {}
    for raw in text.replace("\n", ",").split(","):
        tag = raw.strip().lower()
        if tag:
            seen.setdefault(tag, None)
    return list(seen)


class SidecarTagger:
    """Tags from the sidecar caption; every tag is certain (score 1.0). No sidecar: no tags."""

    name = "sidecar"

    def tag(self, request: TagRequest) -> TagResult:
        tags = parse_sidecar(request.sidecar_text)
        return TagResult(tags=tags, scores=[1.0] * len(tags))


def build_tagger(config: TaggerConfig) -> Tagger:
    if config.backend == "sidecar":
        return SidecarTagger()
    raise ValueError(f"tagger.backend {config.backend!r} is not implemented")


def tag_images(rows: pd.DataFrame, tagger: Tagger) -> pd.DataFrame:
    """The tags table for manifest rows (columns image_id, tags, scores, tagger)."""
    records = []
    for row in rows.itertuples():
        sidecar = row.sidecar_text if isinstance(row.sidecar_text, str) else None
        result = tagger.tag(TagRequest(row.image_id, row.image_path, sidecar))
        records.append(
            {
                "image_id": row.image_id,
                "tags": result.tags,
                "scores": [float(score) for score in result.scores],
                "tagger": tagger.name,
            }
        )
    return pd.DataFrame(records, columns=TAG_COLUMNS)


def tag_folder(
    ingest_dir: str | Path, dedupe_dir: str | Path, out_dir: str | Path, config: TaggerConfig
) -> pd.DataFrame:
    """Tag the kept images; write `out_dir/tags.parquet` and return the table."""
    manifest = pd.read_parquet(Path(ingest_dir) / "manifest.parquet")
    dedupe_table = pd.read_parquet(Path(dedupe_dir) / "dedupe.parquet")
    table = tag_images(kept_rows(manifest, dedupe_table), build_tagger(config))
    write_parquet(Path(out_dir) / "tags.parquet", table)
    untagged = int((table["tags"].map(len) == 0).sum())
    log.info("tag: %d images tagged with %s, %d without tags", len(table), config.backend, untagged)
    return table
