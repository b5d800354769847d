"""DVC stage `score`: CLIP-I against the dataset's train images, CLIP-T against the prompts."""

from charaforge import scoring
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/generate/index.parquet", "data/dataset/metadata.parquet")
    scores = scoring.score_sweep(
        "data/generate", "data/dataset", ctx.params.score, ctx.params.data.trigger, "data/score"
    )
    ctx.run.log_metrics(
        {
            "images_scored": len(scores),
            "clip_i_mean": float(scores["clip_i"].mean()),
            "clip_t_mean": float(scores["clip_t"].mean()),
        }
    )
    ctx.run.set_tags({"charaforge.clip_stand_in": ctx.params.score.clip.source == "stand_in"})
    ctx.run.log_artifact("data/score/scorers.json")


if __name__ == "__main__":
    run_stage("score", body, sections=("score", "data"))
