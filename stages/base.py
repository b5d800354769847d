"""DVC stage `base`: the base model (a tiny stand-in built from a seed, or a weights reference)."""

from charaforge import models
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    info = models.write_base(ctx.params.model, "data/base")
    ctx.run.set_tags({"stand_in": info.stand_in, "model.family": info.family})
    ctx.run.log_artifact("data/base/model.json")


if __name__ == "__main__":
    run_stage("base", body, sections=("model",))
