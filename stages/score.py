"""DVC stage `score`: CLIP-I, CLIP-T, ArcFace identity, pose fidelity, tag consistency,
diversity and memorisation for every image of the sweep."""

import numpy as np

from charaforge import scoring
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/generate/index.parquet", "data/dataset/metadata.parquet")
    scores = scoring.score_sweep(
        "data/generate",
        "data/dataset",
        ctx.params.score,
        ctx.params.data.trigger,
        "data/score",
        pose_dir="data/pose",
        pose_config=ctx.params.pose,
        tagger_config=ctx.params.tagger,
    )
    metrics = {"images_scored": len(scores)}
    for name in scoring.METRICS:
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
    ctx.run.log_artifact("data/score/scorers.json")


if __name__ == "__main__":
    run_stage("score", body, sections=("score", "data", "pose", "tagger"))
