"""DVC stage `ingest`: validate and normalise images; quarantine broken ones."""

from charaforge import ingest
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    data = ctx.params.data
    summary = ingest.ingest_folder(data.source, "data/ingest", data.ingest)
    ctx.tag_data_hash("data/ingest/manifest.parquet")
    ctx.run.log_metrics(
        {
            "images": summary.images,
            "unique_images": summary.unique_images,
            "quarantined": summary.quarantined,
            "ignored_files": summary.ignored,
            **{f"quarantined_{kind}": count for kind, count in summary.quarantined_by_kind.items()},
        }
    )
    ctx.run.log_artifact("data/ingest/summary.json")
    ctx.run.log_artifact("data/ingest/quarantine.parquet")
    ctx.run.log_artifact("data/ingest/manifest.parquet")


if __name__ == "__main__":
    run_stage("ingest", body, sections=("data",))
