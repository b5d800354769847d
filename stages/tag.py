"""DVC stage `tag`: tag the kept images (sidecar captions, or a tagger model)."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.tagging import run


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash(f"{layout.DEDUPE_DIR}/dedupe.parquet")
    table = run.tag_folder(layout.INGEST_DIR, layout.DEDUPE_DIR, layout.TAG_DIR, ctx.params.tagger)
    tag_counts = table["tags"].map(len)
    ctx.run.log_metrics(
        {
            "images": len(table),
            "untagged": int((tag_counts == 0).sum()),
            "distinct_tags": len({tag for tags in table["tags"] for tag in tags}),
            "mean_tags_per_image": float(tag_counts.mean()) if len(table) else 0.0,
        }
    )
    ctx.run.set_tags({"charaforge.tagger": ", ".join(sorted(set(table["tagger"])))})
    ctx.run.log_artifact(f"{layout.TAG_DIR}/tags.parquet")
    ctx.run.log_artifact(f"{layout.TAG_DIR}/tag_frequency.csv")


if __name__ == "__main__":
    run_stage("tag", body, sections=("tagger",))
