"""DVC stage `report`: rank candidate x checkpoint x scale, name the champion, write the report."""

from charaforge import report
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/score/scores.parquet")
    selection = report.report_selection(
        "data/score",
        "data/generate",
        "data/train",
        ctx.params.report,
        "reports",
        "data/base",
        seed=ctx.params.seed,
    )
    champion = selection.champion
    ctx.run.log_metrics(
        {
            "champion_composite": champion["composite"],
            "champion_clip_i": champion["clip_i"],
            "champion_clip_t": champion["clip_t"],
        }
    )
    ctx.run.set_tags(
        {
            "charaforge.champion": f"{champion['candidate']}/step-{champion['step']}"
            f"/scale-{champion['lora_scale']:g}",
            "charaforge.statistical_tie": selection.statistical_tie,
        }
    )
    # One metric series per candidate checkpoint (MLflow step = training step), best scale each.
    table = selection.table
    for candidate in sorted(table["candidate"].unique()):
        rows = table[table["candidate"] == candidate]
        for step, group in rows.groupby("step", sort=True):
            ctx.run.log_metrics(
                {f"composite.{candidate}": float(group["composite"].max())}, step=int(step)
            )
    if ctx.run.run_id is not None:
        version = report.promote_champion(
            selection, "data/train", ctx.params.report.registered_model, bool(selection.stand_in)
        )
        ctx.run.set_tags({"charaforge.registry_version": version or "none"})
    for path in ("reports/metrics.json", "reports/selection.md", "reports/selection.html"):
        ctx.run.log_artifact(path, artifact_path="report")
    ctx.run.log_artifact("reports/plots/score_by_step", artifact_path="report/score_by_step")


if __name__ == "__main__":
    run_stage("report", body, sections=("report",))
