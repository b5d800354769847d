"""DVC stage `tag`: tag the kept images (sidecar captions, or a tagger model)."""

from charaforge import tagging
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/dedupe/dedupe.parquet")
    table = tagging.tag_folder("data/ingest", "data/dedupe", "data/tag", ctx.params.tagger)
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
    ctx.run.log_artifact("data/tag/tags.parquet")
    ctx.run.log_artifact("data/tag/tag_frequency.csv")


if __name__ == "__main__":
    run_stage("tag", body, sections=("tagger",))
