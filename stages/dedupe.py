"""DVC stage `dedupe`: drop exact and near-duplicates; write clusters and a contact sheet."""

from charaforge import dedupe
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/ingest/manifest.parquet")
    summary = dedupe.dedupe_folder("data/ingest", "data/dedupe", ctx.params.data.dedupe)
    ctx.run.log_metrics(
        {
            "rows": summary.rows,
            "kept": summary.kept,
            "dropped": summary.dropped,
            "duplicate_clusters": summary.clusters,
        }
    )
    ctx.run.log_artifact("data/dedupe/dedupe.parquet")
    ctx.run.log_artifact("data/dedupe/contact_sheet.png")


if __name__ == "__main__":
    run_stage("dedupe", body, sections=("data",))
