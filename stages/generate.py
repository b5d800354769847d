"""DVC stage `generate`: render the evaluation sweep with the generation engine."""

from charaforge import sweep
from charaforge.engine import GenerationEngine
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    params = ctx.params
    ctx.tag_data_hash("data/train/summary.json")
    engine = GenerationEngine(
        "data/base",
        scheduler=params.eval.scheduler,
        controlnets=dict(params.eval.controlnets),
        cpu_threads=params.eval.cpu_threads,
    )
    ctx.run.set_tags({"stand_in": engine.base.stand_in})
    ctx.run.log_params({"data": {"trigger": params.data.trigger}})
    result = sweep.run_sweep(
        engine,
        "data/train",
        params.eval,
        trigger=params.data.trigger,
        resolution=params.model.resolution,
        seed=params.seed,
        out_dir="data/generate",
        pose_dir="data/pose" if params.eval.pose.enabled else None,
    )
    ctx.run.log_metrics(
        {
            "images": len(result.index),
            "rendered": result.rendered,
            "images_per_second": result.images_per_second,
        }
    )
    ctx.run.log_artifact("data/generate/index.parquet")
    for grid in result.grids:
        ctx.run.log_artifact(str(grid))


if __name__ == "__main__":
    run_stage("generate", body, sections=("model", "eval"))
