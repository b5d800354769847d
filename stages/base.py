"""DVC stage `base`: the base model (a tiny stand-in built from a seed, or a weights reference)."""

from charaforge.core import layout
from charaforge.models import base
from charaforge.pipeline.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    info = base.write_base(ctx.params.model, layout.BASE_DIR)
    ctx.run.set_tags({"stand_in": info.stand_in, "world": info.world, "model.family": info.family})
    ctx.run.log_artifact(f"{layout.BASE_DIR}/model.json")


if __name__ == "__main__":
    run_stage("base", body, sections=("model",))
