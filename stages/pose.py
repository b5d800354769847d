"""DVC stage `pose`: MediaPipe landmarks, COCO-17 view and OpenPose-style skeletons."""

from charaforge import pose
from charaforge.stage import StageContext, run_stage


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash("data/dedupe/dedupe.parquet")
    table = pose.pose_folder("data/ingest", "data/dedupe", "data/pose", ctx.params.pose)
    people = int(table["has_person"].sum())
    ctx.run.log_metrics(
        {
            "images": len(table),
            "with_person": people,
            "detection_rate": people / len(table) if len(table) else 0.0,
        }
    )
    ctx.run.log_artifact("data/pose/keypoints.parquet")
    ctx.run.log_artifact("data/pose/skeletons", artifact_path="skeletons")
    ctx.run.log_artifact("data/pose/openpose", artifact_path="openpose")


if __name__ == "__main__":
    run_stage("pose", body, sections=("pose",))
