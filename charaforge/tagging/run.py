"""The `tag` stage's work: build the configured tagger, tag the kept images, write the tables."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from charaforge.config import TaggerConfig
from charaforge.core.contracts import kept_rows, tag_frequency
from charaforge.core.files import write_csv, write_parquet
from charaforge.core.progress import PROGRESS_MIN, progress
from charaforge.tagging.base import (
    TAG_COLUMNS,
    Tagger,
    TagRequest,
    TagResult,
    postprocess,
)
from charaforge.tagging.sidecar import SidecarTagger

log = logging.getLogger(__name__)


def build_tagger(config: TaggerConfig, backend: str | None = None) -> Tagger:
    """The tagger `backend` (default `config.backend`) names; model backends load weights here."""
    backend = backend or config.backend
    # The model backends import where they are used: CLIP pulls in torch (~3 s), WD14
    # onnxruntime; the sidecar backend and the WD14 stage need neither torch nor the other.
    if backend == "sidecar":
        return SidecarTagger()
    if backend == "clip":
        from charaforge.tagging.clip import ClipZeroShotTagger

        return ClipZeroShotTagger.from_config(config)
    if backend == "wd14":
        from charaforge.tagging.wd14 import Wd14Tagger

        return Wd14Tagger.from_config(config)
    raise ValueError(f"tagger.backend {backend!r} is not implemented")


# Images per tagger call: bounds the decoded images and score rows held at once (a WD14 row is
# ~10k floats) whatever the folder's size.
TAG_CHUNK = 512


def _run_tagger(tagger: Tagger, requests: list[TagRequest]) -> list[TagResult]:
    """Results in request order, `TAG_CHUNK` images at a time (a multiple of the tagger's own
    batch size, so batches hold the same images as in one call: the same scores)."""
    many = getattr(tagger, "tag_many", None)
    if many is None:
        return [tagger.tag(request) for request in progress(requests, len(requests), "tag")]
    batch = max(1, int(getattr(tagger, "batch_size", 1)))
    chunk = max(batch, TAG_CHUNK // batch * batch)
    starts = range(0, len(requests), chunk)
    bar = tqdm(
        total=len(requests),
        desc=f"tag ({tagger.name})",
        unit="img",
        disable=len(requests) < PROGRESS_MIN,
    )
    results: list[TagResult] = []
    for start in starts:
        part = requests[start : start + chunk]
        results.extend(many(part))
        bar.update(len(part))
    bar.close()
    return results


def tag_images(
    rows: pd.DataFrame,
    tagger: Tagger,
    config: TaggerConfig | None = None,
    fill_missing: Tagger | None = None,
) -> pd.DataFrame:
    """The tags table for manifest rows (columns image_id, tags, scores, tagger).

    With `config`, its replacements and allow/deny lists are applied to every image's tags.
    `fill_missing` tags the images `tagger` left without tags (those without a sidecar caption);
    the `tagger` column names, per image, the tagger its tags came from.
    """
    requests = [
        TagRequest(
            row.image_id,
            row.image_path,
            row.sidecar_text if isinstance(row.sidecar_text, str) else None,
        )
        for row in rows.itertuples()
    ]
    results = _run_tagger(tagger, requests)
    names = [tagger.name] * len(requests)
    if fill_missing is not None:
        missing = [index for index, result in enumerate(results) if not result.tags]
        filled = _run_tagger(fill_missing, [requests[index] for index in missing])
        for index, result in zip(missing, filled, strict=True):
            results[index], names[index] = result, fill_missing.name
    records = []
    for request, result, name in zip(requests, results, names, strict=True):
        if config is not None:
            result = postprocess(result, config)
        records.append(
            {
                "image_id": request.image_id,
                "tags": result.tags,
                "scores": [float(score) for score in result.scores],
                "tagger": name,
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
    fill = build_tagger(config, config.fill_missing) if config.fill_missing else None
    table = tag_images(kept_rows(manifest, dedupe_table), tagger, config, fill)
    write_parquet(Path(out_dir) / "tags.parquet", table)
    write_csv(Path(out_dir) / "tag_frequency.csv", tag_frequency(table["tags"]))
    for model in (tagger, fill):
        if getattr(model, "stand_in", False):
            log.warning("tag: %s uses a stand-in model: its tags mean nothing", model.name)
    untagged = int((table["tags"].map(len) == 0).sum())
    log.info("tag: %d images tagged with %s, %d without tags", len(table), config.backend, untagged)
    if untagged and tagger.name == SidecarTagger.name and fill is None:
        log.warning(
            "tag: %d of %d images have no sidecar caption and no model tagger is configured "
            "(tagger.fill_missing, or tagger=clip / tagger=wd14)",
            untagged,
            len(table),
        )
    return table
