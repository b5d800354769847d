"""DVC stage `dataset`: metadata table, captions, train/val split, kohya and imagefolder exports."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import dataset


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash(
        f"{layout.INGEST_DIR}/manifest.parquet", f"{layout.DEDUPE_DIR}/dedupe.parquet"
    )
    data = ctx.params.data
    summary = dataset.build_dataset(
        layout.INGEST_DIR,
        layout.DEDUPE_DIR,
        layout.TAG_DIR,
        layout.POSE_DIR,
        layout.DATASET_DIR,
        data.dataset,
        character=data.character,
        trigger=data.trigger,
        seed=ctx.params.seed,
        allow_trigger_only_captions=data.allow_trigger_only_captions,
    )
    ctx.run.log_metrics(
        {
            "images": summary.images,
            "train": summary.train,
            "val": summary.val,
            "without_person": summary.without_person,
            "without_tags": summary.without_tags,
            "trigger_only_captions": summary.trigger_only_captions,
        }
    )
    ctx.run.log_artifact(f"{layout.DATASET_DIR}/metadata.parquet")
    ctx.run.log_artifact(f"{layout.DATASET_DIR}/README.md")
    ctx.run.log_artifact(f"{layout.DATASET_DIR}/tag_frequency.png")


if __name__ == "__main__":
    run_stage("dataset", body, sections=("data",))
