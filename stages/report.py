"""DVC stage `report`: rank candidate x checkpoint x scale, name the champion, write the report."""

import math

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
    table = selection.table
    metric_columns = [
        column
        for column in table.columns
        if column not in ("rank", "candidate", "step", "lora_scale", "n_images", "pareto")
        and column not in ("memorising", "ci_low", "ci_high")
    ]
    ctx.run.log_metrics(
        {
            f"champion_{name}": float(champion[name])
            for name in metric_columns
            if not math.isnan(float(champion[name]))
        }
    )
    if selection.baseline is not None:
        ctx.run.log_metrics({"champion_minus_baseline": selection.baseline.difference})
    ctx.run.set_tags(
        {
            "charaforge.champion": f"{champion['candidate']}/step-{champion['step']}"
            f"/scale-{champion['lora_scale']:g}",
            "charaforge.statistical_tie": selection.statistical_tie,
            "charaforge.beats_baseline": selection.baseline is not None
            and selection.baseline.verdict == "beats",
            "charaforge.stand_in": bool(selection.stand_in),
        }
    )
    # One metric series per candidate and metric (MLflow step = training step), at each
    # checkpoint's best LoRA scale.
    for candidate in sorted(table["candidate"].unique()):
        rows = table[table["candidate"] == candidate]
        for step, group in rows.groupby("step", sort=True):
            best = group.sort_values(["composite", "lora_scale"], ascending=[False, True]).iloc[0]
            values = {
                f"{name}.{candidate}": float(best[name])
                for name in metric_columns
                if not math.isnan(float(best[name]))
            }
            ctx.run.log_metrics(values, step=int(step))
    if ctx.run.run_id is not None:
        version = report.promote_champion(
            selection, "data/train", ctx.params.report.registered_model, bool(selection.stand_in)
        )
        ctx.run.set_tags({"charaforge.registry_version": version or "none"})
    for path in ("reports/metrics.json", "reports/selection.md", "reports/selection.html"):
        ctx.run.log_artifact(path, artifact_path="report")
    ctx.run.log_artifact("reports/plots/score_by_step", artifact_path="report/score_by_step")
    ctx.run.log_artifact("reports/plots/pareto.csv", artifact_path="report")


if __name__ == "__main__":
    run_stage("report", body, sections=("report",))
