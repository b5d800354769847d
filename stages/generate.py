"""DVC stage `generate`: render the evaluation sweep with the generation engine."""

from charaforge import sweep
from charaforge.engine import GenerationEngine
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    params = ctx.params
    ctx.tag_data_hash("data/train/summary.json")
    engine = GenerationEngine("data/base", scheduler=params.eval.scheduler)
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
    )
    ctx.run.log_metrics(
        {
            "images": len(result.index),
            "rendered": result.rendered,
            "images_per_second": result.images_per_second,
        }
    )
    ctx.run.log_artifact("data/generate/index.parquet")


if __name__ == "__main__":
    run_stage("generate", body, sections=("model", "eval"))
