"""DVC stage `pose`: MediaPipe landmarks, COCO-17 view and OpenPose-style skeletons."""

from charaforge.core import layout
from charaforge.pipeline.stage import StageContext, run_stage
from charaforge.prepare import pose


def body(ctx: StageContext) -> None:
    ctx.tag_data_hash(f"{layout.DEDUPE_DIR}/dedupe.parquet")
    table = pose.pose_folder(layout.INGEST_DIR, layout.DEDUPE_DIR, layout.POSE_DIR, ctx.params.pose)
    people = int(table["has_person"].sum())
    ctx.run.log_metrics(
        {
            "images": len(table),
            "with_person": people,
            "detection_rate": people / len(table) if len(table) else 0.0,
        }
    )
    ctx.run.log_artifact(f"{layout.POSE_DIR}/keypoints.parquet")
    ctx.run.log_artifact(f"{layout.POSE_DIR}/skeletons", artifact_path="skeletons")
    ctx.run.log_artifact(f"{layout.POSE_DIR}/openpose", artifact_path="openpose")


if __name__ == "__main__":
    run_stage("pose", body, sections=("pose",))
