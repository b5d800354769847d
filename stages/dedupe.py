"""DVC stage `dedupe`: drop exact and near-duplicates; write clusters and a contact sheet."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import dedupe


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash(f"{layout.INGEST_DIR}/manifest.parquet")
    summary = dedupe.dedupe_folder(layout.INGEST_DIR, layout.DEDUPE_DIR, ctx.params.data.dedupe)
    ctx.run.log_metrics(
        {
            "rows": summary.rows,
            "kept": summary.kept,
            "dropped": summary.dropped,
            "duplicate_clusters": summary.clusters,
        }
    )
    ctx.run.log_artifact(f"{layout.DEDUPE_DIR}/dedupe.parquet")
    ctx.run.log_artifact(f"{layout.DEDUPE_DIR}/contact_sheet.png")


if __name__ == "__main__":
    run_stage("dedupe", body, sections=("data",))
