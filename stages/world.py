"""DVC stage `world`: pretrain the world models (with model=world), or note that they are unused.

The diffusion model and the scorers train in two one-thread processes side by side. data/world is
byte-identical from run to run; the timings go to reports/world.json and MLflow.
"""

from charaforge.core.files import write_json
from charaforge.core.layout import REPORTS_DIR, WORLD_DIR
from charaforge.models.world_files import CONTACT_SHEET, LOSSES_CSV, WORLD_JSON, write_unused
from charaforge.pipeline.stage import StageContext, run_stage

# One point in MLflow every this many training steps: the curve without 1,500 tracking calls.
LOSS_LOG_EVERY = 10


def body(ctx: StageContext) -> None:
    source = ctx.params.model.source
    if source == "world":
        from charaforge.models.world import train_world  # torch: only when the world trains

        result = train_world(ctx.params.world, WORLD_DIR, ctx.params.seed, source)
    else:
        result = {**write_unused(WORLD_DIR, source), "timings": {}}
    ctx.run.set_tags({"world.used": result["used"]})
    timings_json = f"{REPORTS_DIR}/world.json"
    write_json(timings_json, {"used": result["used"], **result["timings"]})
    if not result["used"]:
        return
    for model in ("vae", "unet"):
        losses = result[f"{model}_losses"]
        for step in range(0, len(losses), LOSS_LOG_EVERY):
            ctx.run.log_metrics({f"world.{model}_loss": losses[step]}, step)
    diffusion = result["diffusion"]
    ctx.run.log_metrics(
        {
            "world.reconstruction_mse": diffusion["reconstruction_mse"],
            "world.vae_final_loss": diffusion["vae_final_loss"],
            "world.unet_final_loss": diffusion["unet_final_loss"],
            "world.stage_seconds": result["timings"]["stage_seconds"],
            "world.diffusion_cpu_seconds": result["timings"]["diffusion_cpu_seconds"]["total"],
        }
    )
    for name in (WORLD_JSON, LOSSES_CSV, CONTACT_SHEET):
        ctx.run.log_artifact(f"{WORLD_DIR}/{name}", artifact_path="world")
    ctx.run.log_artifact(timings_json, artifact_path="world")


if __name__ == "__main__":
    run_stage("world", body, sections=("world",))
