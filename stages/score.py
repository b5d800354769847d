"""DVC stage `score`: CLIP-I, CLIP-T, ArcFace identity, pose fidelity, tag consistency,
diversity and memorisation for every image of the sweep."""

import numpy as np

from charaforge.core import layout
from charaforge.evaluate.columns import METRICS
from charaforge.evaluate.sweep import SCORERS_FILE, score_sweep
from charaforge.models.base import set_cpu_threads
from charaforge.pipeline.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    set_cpu_threads(ctx.params.score.cpu_threads)
    ctx.tag_data_hash(
        f"{layout.GENERATE_DIR}/index.parquet", f"{layout.DATASET_DIR}/metadata.parquet"
    )
    scores = score_sweep(
        layout.GENERATE_DIR,
        layout.DATASET_DIR,
        ctx.params.score,
        ctx.params.data.trigger,
        layout.SCORE_DIR,
        pose_dir=layout.POSE_DIR,
        pose_config=ctx.params.pose,
        tagger_config=ctx.params.tagger,
    )
    metrics = {"images_scored": len(scores)}
    for name in METRICS:
        values = scores[name].to_numpy(dtype=np.float64)
        if not np.isnan(values).all():
            metrics[f"{name}_mean"] = float(np.nanmean(values))
    ctx.run.log_metrics(metrics)
    ctx.run.set_tags(
        {
            "charaforge.clip_stand_in": ctx.params.score.clip.source == "stand_in",
            "charaforge.arcface_stand_in": ctx.params.score.face.recognition == "stand_in",
        }
    )
    ctx.run.log_artifact(f"{layout.SCORE_DIR}/{SCORERS_FILE}")
    ctx.tag_output_hash(f"{layout.SCORE_DIR}/scores.parquet")  # the report links to this run by it


if __name__ == "__main__":
    run_stage("score", body, sections=("score", "data", "pose", "tagger"))
