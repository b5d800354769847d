"""DVC stage `generate`: render the evaluation sweep with the generation engine."""

from charaforge.config import EvalConfig, Params
from charaforge.core import layout
from charaforge.distributed.accelerate_sweep import AccelerateSweepExecutor
from charaforge.distributed.devices_sweep import DevicesSweepExecutor, check_device_ids
from charaforge.distributed.ray_sweep import RaySweepExecutor
from charaforge.generate import data_prompts, prompts, sweep
from charaforge.generate.engine import GenerationEngine
from charaforge.models.base import read_base_info
from charaforge.pipeline.stage import StageContext, run_stage


def engine_options(eval: EvalConfig) -> dict:
    return {
        "scheduler": eval.scheduler,
        "controlnets": dict(eval.controlnets),
        "cpu_threads": eval.cpu_threads,
        "ip_adapter": eval.ip_adapter,
        "batch_mode": eval.batch_mode,
    }


def ray_executor(params: Params) -> RaySweepExecutor:
    """The sweep's Ray executor; its actors are the process's kept pool (engine_pool.py), so
    every call for the same params finds the same actors."""
    options = engine_options(params.eval)
    return RaySweepExecutor(params.ray, params.eval.workers, layout.BASE_DIR, options)


def before(params: Params) -> None:
    """After validation, before tracking: the suite files are checked (placeholders included)
    before any model loads; with eval.executor ray the actors start here, so that their start-up
    (a new process importing torch and diffusers, loading the base) overlaps this process's
    MLflow set-up (importing mlflow, opening the store) instead of following it."""
    prompts.check_suites(params.eval)
    if params.eval.executor == "ray":
        ray_executor(params).start()


def body(ctx: StageContext) -> None:
    params = ctx.params
    ctx.tag_data_hash(f"{layout.TRAIN_DIR}/summary.json")
    options = engine_options(params.eval)
    devices = check_device_ids("eval.devices", params.eval.devices or [])
    executor, engine = None, None
    if params.eval.executor == "ray":
        executor = ray_executor(params)
        executor.start()  # started by `before` already: the kept pool's actors
        # The engines live in the actors: one here would only take CPU from their start-up.
        stand_in = read_base_info(layout.BASE_DIR).stand_in
    else:
        device = devices[0] if devices else None
        engine = GenerationEngine(layout.BASE_DIR, **options, device=device)
        stand_in = engine.base.stand_in
    ctx.run.set_tags({"stand_in": stand_in})
    ctx.run.log_params({"data": {"trigger": params.data.trigger}})
    # eval.from_data: the prompts built from the character's own dataset join the hand-written.
    eval_config = data_prompts.resolve_prompts(params.eval, layout.DATASET_DIR)
    ctx.run.log_params({"eval": {"resolved_prompts": " | ".join(eval_config.prompts)}})
    if params.eval.executor == "accelerate":
        executor = AccelerateSweepExecutor(engine)
    elif len(devices) > 1:  # one engine per device, in this process
        others = [GenerationEngine(layout.BASE_DIR, **options, device=d) for d in devices[1:]]
        executor = DevicesSweepExecutor([engine, *others])
    result = sweep.run_sweep(
        engine,
        layout.TRAIN_DIR,
        eval_config,
        trigger=params.data.trigger,
        resolution=params.model.resolution,
        seed=params.seed,
        out_dir=layout.GENERATE_DIR,
        pose_dir=layout.POSE_DIR if params.eval.pose.enabled else None,
        # The photos the control-type axis makes its maps from (eval.pose.control_types).
        ingest_dir=layout.INGEST_DIR if params.eval.pose.enabled else None,
        work_dir=layout.GENERATE_WORK_DIR,
        executor=executor,
        stand_in=stand_in,
    )
    ctx.run.log_metrics(
        {
            "images": len(result.index),
            "rendered": result.rendered,
            "images_per_second": result.images_per_second,
        }
    )
    ctx.run.log_artifact(f"{layout.GENERATE_DIR}/index.parquet")
    for grid in result.grids:
        ctx.run.log_artifact(str(grid))


if __name__ == "__main__":
    run_stage("generate", body, sections=("model", "eval"), before=before)
