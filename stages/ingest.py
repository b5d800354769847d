"""DVC stage `ingest`: validate and normalise images; quarantine broken ones."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import ingest


def body(ctx: StageContext) -> None:
    data = ctx.params.data
    summary = ingest.ingest_folder(data.source, layout.INGEST_DIR, data.ingest)
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
