"""DVC stage `demo`: generate the built-in demo set (ground truth for the data stages)."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import demo


def body(ctx: StageContext) -> None:
    data = ctx.params.data
    summary = demo.make_demo_set(layout.DEMO_DIR, data.demo, data.character, ctx.params.seed)
    ctx.run.log_metrics(
        {
            "images": summary.images,
            "near_duplicates": summary.duplicates,
            "broken_files": summary.broken,
            "photos": summary.photos,
        }
    )
    ctx.run.log_artifact(f"{layout.DEMO_DIR}/ground_truth.json")


if __name__ == "__main__":
    run_stage("demo", body, sections=("data",))
