"""DVC stage `report`: rank candidate x checkpoint x scale, name the champion, write the report."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.pipeline.tracking import tracking_uri
from charaforge.selection import mlflow_links, report, tracking
from charaforge.selection.champion import Selection

# The files the report reads whose writers it links to in MLflow (by their output hash).
LINKED_OUTPUTS = {
    "train": [f"{layout.TRAIN_DIR}/summary.json"],
    "score": [f"{layout.SCORE_DIR}/scores.parquet"],
}


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash(f"{layout.SCORE_DIR}/scores.parquet")
    params = ctx.params
    registered: list[str | None] = []  # the champion's model version, once registered

    def links(selection: Selection) -> mlflow_links.MlflowLinks | None:
        # Registered before the pages are written, so that they can link to the version; the
        # alias `@champion` moves only after they are (tracking.log_selection).
        if ctx.run.run_id is None:
            return None
        stand_in = bool(selection.stand_in)
        version = tracking.register_champion(
            selection, layout.TRAIN_DIR, params.report.registered_model, stand_in,
            params.data.character,
        )  # fmt: skip
        registered.append(version)
        if not params.report.mlflow_links:
            return None
        return mlflow_links.report_links(
            ctx.run.run_id, params.tracking, params.report.registered_model, version,
            LINKED_OUTPUTS,
        )  # fmt: skip

    selection = report.report_selection(
        layout.SCORE_DIR,
        layout.GENERATE_DIR,
        layout.TRAIN_DIR,
        params.report,
        layout.REPORTS_DIR,
        layout.BASE_DIR,
        seed=params.seed,
        character=params.data.character,
        trigger=params.data.trigger,
        experiment=params.tracking.experiment if params.tracking.enabled else "",
        mlflow_links=links,
        mlflow_ui=mlflow_links.ui_base(params.tracking, tracking_uri(params.tracking)),
    )
    tracking.log_selection(
        ctx.run,
        selection,
        layout.TRAIN_DIR,
        params.report.registered_model,
        layout.REPORTS_DIR,
        character=params.data.character,
        registered=bool(registered),
        registry_version=registered[0] if registered else None,
    )


if __name__ == "__main__":
    run_stage("report", body, sections=("report",))
