"""The `tag` stage's work: build the configured tagger, tag the kept images, write the tables."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from charaforge.config import TaggerConfig
from charaforge.core.contracts import kept_rows, tag_frequency
from charaforge.core.files import write_csv, write_parquet
from charaforge.tagging.base import (
    TAG_COLUMNS,
    Tagger,
    TagRequest,
    postprocess,
)
from charaforge.tagging.clip import ClipZeroShotTagger
from charaforge.tagging.sidecar import SidecarTagger
from charaforge.tagging.wd14 import Wd14Tagger

log = logging.getLogger(__name__)


def build_tagger(config: TaggerConfig) -> Tagger:
    """The tagger `config.backend` names (model backends load their weights here)."""
    if config.backend == "sidecar":
        return SidecarTagger()
    if config.backend == "clip":
        return ClipZeroShotTagger.from_config(config)
    if config.backend == "wd14":
        return Wd14Tagger.from_config(config)
    raise ValueError(f"tagger.backend {config.backend!r} is not implemented")


def tag_images(
    rows: pd.DataFrame, tagger: Tagger, config: TaggerConfig | None = None
) -> pd.DataFrame:
    """The tags table for manifest rows (columns image_id, tags, scores, tagger).

    With `config`, its replacements and allow/deny lists are applied to every image's tags.
    """
    requests = [
        TagRequest(
            row.image_id,
            row.image_path,
            row.sidecar_text if isinstance(row.sidecar_text, str) else None,
        )
        for row in rows.itertuples()
    ]
    many = getattr(tagger, "tag_many", None)
    results = many(requests) if many else [tagger.tag(request) for request in requests]
    records = []
    for request, result in zip(requests, results, strict=True):
        if config is not None:
            result = postprocess(result, config)
        records.append(
            {
                "image_id": request.image_id,
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
    tagger = build_tagger(config)
    table = tag_images(kept_rows(manifest, dedupe_table), tagger, config)
    write_parquet(Path(out_dir) / "tags.parquet", table)
    write_csv(Path(out_dir) / "tag_frequency.csv", tag_frequency(table["tags"]))
    if getattr(tagger, "stand_in", False):
        log.warning("tag: %s uses a stand-in model: its tags mean nothing", tagger.name)
    untagged = int((table["tags"].map(len) == 0).sum())
    log.info("tag: %d images tagged with %s, %d without tags", len(table), config.backend, untagged)
    return table
