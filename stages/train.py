"""DVC stage `train`: train every LoRA candidate of the grid, with checkpoints and loss curves."""

from charaforge import models, train
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/dataset/metadata.parquet")
    ctx.run.set_tags({"stand_in": models.read_base_info("data/base").stand_in})

    def log_step(candidate: str, step: int, metrics: dict[str, float]) -> None:
        logged = {
            f"{key}.{candidate}": metrics[key] for key in ("loss", "val_loss") if key in metrics
        }
        ctx.run.log_metrics(logged, step=step)

    results = train.train_all(
        "data/base",
        "data/dataset",
        ctx.params.train,
        resolution=ctx.params.model.resolution,
        seed=ctx.params.seed,
        out_dir="data/train",
        plots_dir="reports/plots/train_loss",
        on_step=log_step,
        trigger=ctx.params.data.trigger,
    )
    for result in results:
        ctx.run.log_metrics(
            {
                f"final_loss.{result.name}": result.final_loss,
                f"seconds_per_step.{result.name}": result.seconds / ctx.params.train.max_steps,
            }
        )
        # The final LoRA, in both layouts (diffusers and kohya/A1111).
        last = result.checkpoints[-1]
        folder = f"data/train/{result.name}/checkpoint-{last}"
        ctx.run.log_artifact(folder, artifact_path=f"lora/{result.name}")
    ctx.run.log_artifact("data/train/summary.json")


if __name__ == "__main__":
    run_stage("train", body, sections=("model", "train"))
