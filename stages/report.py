"""DVC stage `report`: rank candidate x checkpoint x scale, name the champion, write the report."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.selection import report, tracking


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash(f"{layout.SCORE_DIR}/scores.parquet")
    selection = report.report_selection(
        layout.SCORE_DIR,
        layout.GENERATE_DIR,
        layout.TRAIN_DIR,
        ctx.params.report,
        layout.REPORTS_DIR,
        layout.BASE_DIR,
        seed=ctx.params.seed,
        character=ctx.params.data.character,
        trigger=ctx.params.data.trigger,
        experiment=ctx.params.tracking.experiment if ctx.params.tracking.enabled else "",
    )
    tracking.log_selection(
        ctx.run,
        selection,
        layout.TRAIN_DIR,
        ctx.params.report.registered_model,
        layout.REPORTS_DIR,
        character=ctx.params.data.character,
    )


if __name__ == "__main__":
    run_stage("report", body, sections=("report",))
