"""DVC stage `ingest`: validate and normalise the images the scan kept; quarantine broken ones."""

import json
from pathlib import Path

import pandas as pd

from charaforge.core import layout
from charaforge.errors import MissingInputError, require_stage_output
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import ingest, scan


def body(ctx: StageContext) -> None:
    data = ctx.params.data
    require_stage_output(layout.SCAN_TABLE, "scan")
    scanned = json.loads(Path(layout.SCAN_DIR, "summary.json").read_text(encoding="utf-8"))
    if scanned["source"] != scan.escape_name(data.source):
        raise MissingInputError(
            f"{layout.SCAN_DIR} lists {scanned['source']}, not data.source "
            f"{scan.escape_name(data.source)} (run the `scan` stage first)"
        )
    table = pd.read_parquet(layout.SCAN_TABLE)
    summary = ingest.ingest_folder(data.source, layout.INGEST_DIR, data.ingest, scan=table)
    ctx.tag_data_hash(f"{layout.INGEST_DIR}/manifest.parquet")
    ctx.run.log_metrics(
        {
            "images": summary.images,
            "unique_images": summary.unique_images,
            "quarantined": summary.quarantined,
            "ignored_files": summary.ignored,
            **{f"quarantined_{kind}": count for kind, count in summary.quarantined_by_kind.items()},
        }
    )
    ctx.run.log_artifact(f"{layout.INGEST_DIR}/summary.json")
    ctx.run.log_artifact(f"{layout.INGEST_DIR}/quarantine.parquet")
    ctx.run.log_artifact(f"{layout.INGEST_DIR}/manifest.parquet")


if __name__ == "__main__":
    run_stage("ingest", body, sections=("data",))
