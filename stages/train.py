"""DVC stage `train`: train every LoRA candidate of the grid, with checkpoints and loss curves.

A killed run resumes from the latest full training state in `train.state_dir` (a persistent
folder DVC does not clear) and ends with the same bytes as an uninterrupted one.
"""

import tempfile
from pathlib import Path

from charaforge.config import Params
from charaforge.core import layout
from charaforge.core.layout import LORA_WEIGHTS, kohya_file_name
from charaforge.distributed.ray_grid import train_grid
from charaforge.models import base
from charaforge.models.lora_files import stamp_metadata
from charaforge.pipeline.child_runs import ChildRun, open_child_run
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.pipeline.tracking import git_commit, repository_root
from charaforge.train import RunContext, launch, train_all
from charaforge.train.preflight import check_base


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash(f"{layout.DATASET_DIR}/metadata.parquet")
    info = base.read_base_info(layout.BASE_DIR)
    ctx.run.set_tags({"stand_in": info.stand_in, "model.family": info.family})

    # One nested MLflow run per candidate, its metrics under the same names in every child, so
    # that MLflow's compare view overlays the candidates' curves.
    children: dict[str, ChildRun] = {}
    candidates = {candidate.name: candidate for candidate in ctx.params.train.candidates}

    def child(name: str) -> ChildRun:
        if name not in children:
            character = ctx.params.data.character
            children[name] = open_child_run(
                ctx.run, f"{name} · {character}", tags={"charaforge.candidate": name}
            )
            children[name].log_params(candidates[name].model_dump(mode="json"))
        return children[name]

    def log_step(candidate: str, step: int, metrics: dict[str, float]) -> None:
        child(candidate).log_metrics(metrics, step)

    context = RunContext(trigger=ctx.params.data.trigger, git_commit=git_commit(repository_root()))
    if ctx.params.train.executor == "ray":
        results = train_grid(
            ctx.params.ray, layout.BASE_DIR, layout.DATASET_DIR, ctx.params.train,
            ctx.params.model.resolution, ctx.params.seed, layout.TRAIN_DIR,
            layout.TRAIN_LOSS_PLOTS_DIR, context,
        )  # fmt: skip
    else:
        results = train_all(
            layout.BASE_DIR,
            layout.DATASET_DIR,
            ctx.params.train,
            resolution=ctx.params.model.resolution,
            seed=ctx.params.seed,
            out_dir=layout.TRAIN_DIR,
            plots_dir=layout.TRAIN_LOSS_PLOTS_DIR,
            on_step=log_step,
            trigger=ctx.params.data.trigger,
            context=context,
        )
    for result in results:
        run = child(result.name)
        run.log_metrics(
            {
                "final_loss": result.final_loss,
                "seconds_per_step": result.seconds
                / max(1, ctx.params.train.max_steps - result.resumed_from),
            }
        )
        candidate_dir = Path(layout.TRAIN_DIR) / result.name
        run.log_artifact(candidate_dir / "samples", artifact_path="samples")
        # The final LoRA in both layouts. The copies in MLflow also name the run that made them
        # (the DVC outputs cannot: they must be byte-identical from run to run).
        last = result.checkpoints[-1]
        folder = candidate_dir / f"checkpoint-{last}"
        with tempfile.TemporaryDirectory() as temp:
            for name in (LORA_WEIGHTS, kohya_file_name(result.name, last)):
                stamped = Path(temp) / name
                stamp_metadata(
                    folder / name, stamped, {"charaforge.mlflow_run_id": run.run_id or ""}
                )
                run.log_artifact(stamped, artifact_path="lora")
        run.end()
    ctx.run.log_artifact(f"{layout.TRAIN_DIR}/summary.json")
    ctx.tag_output_hash(f"{layout.TRAIN_DIR}/summary.json")  # the report links to this run by it


def before(params: Params) -> None:
    # The model checks answer from data/base's config files first (about a second), not after
    # the 10-25 s a real model takes to load; then, with train.processes > 1, the relaunch.
    check_base(layout.BASE_DIR, params.train, params.model.resolution)
    launch.relaunch_if_needed(params.train, "stages.train")


if __name__ == "__main__":
    run_stage("train", body, sections=("model", "train"), before=before)
