"""DVC stage `demo`: generate the built-in demo set (ground truth for the data stages)."""

from pathlib import Path

from charaforge.core import layout
from charaforge.core.files import atomic_path
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import demo

NOT_USED = "NOT_USED.txt"


def body(ctx: StageContext) -> None:
    data = ctx.params.data
    if Path(data.source) != Path(layout.DEMO_DIR):
        # The user's own images: nothing to render (the folder must still exist for DVC).
        with atomic_path(layout.DEMO_DIR) as folder:
            folder.mkdir()
            (folder / NOT_USED).write_text(f"data.source is {data.source}: no demo set\n")
        ctx.run.set_tags({"charaforge.demo": "not used"})
        return
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
