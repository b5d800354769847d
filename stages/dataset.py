"""DVC stage `dataset`: metadata table, captions, train/val split, kohya and imagefolder exports."""

from charaforge import dataset
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/ingest/manifest.parquet", "data/dedupe/dedupe.parquet")
    data = ctx.params.data
    summary = dataset.build_dataset(
        "data/ingest",
        "data/dedupe",
        "data/tag",
        "data/pose",
        "data/dataset",
        data.dataset,
        character=data.character,
        trigger=data.trigger,
        seed=ctx.params.seed,
    )
    ctx.run.log_metrics(
        {
            "images": summary.images,
            "train": summary.train,
            "val": summary.val,
            "without_person": summary.without_person,
            "without_tags": summary.without_tags,
        }
    )
    ctx.run.log_artifact("data/dataset/metadata.parquet")
    ctx.run.log_artifact("data/dataset/README.md")
    ctx.run.log_artifact("data/dataset/tag_frequency.png")


if __name__ == "__main__":
    run_stage("dataset", body, sections=("data",))
