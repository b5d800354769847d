"""The sweep's ControlNet conditions: the pose stage's people, each through every control type.

A condition is one person of the pose stage (its skeleton) and one control type of
`eval.pose.control_types`: openpose reads the pose stage's skeleton, every other type a map that
generate.controls makes from the person's ingested photo (`<ingest>/images/<image_id>.png`). The
types are a sweep axis: the same prompts and seeds render once per type, the index's
`control_type` column tells them apart, and the score stage scores them all the same way (pose
fidelity against the person's keypoints, CLIP, identity), so the report compares them.
The maps made from photos are written under the sweep's `controls/` folder, so a user sees what
conditioned each image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from charaforge.config import EvalConfig
from charaforge.core.files import write_png
from charaforge.errors import ConfigError
from charaforge.generate.controls import ControlPreprocessor

log = logging.getLogger(__name__)

CONTROL_DIR = "controls"
OPENPOSE = "openpose"


@dataclass(frozen=True)
class PoseCondition:
    image_id: str
    skeleton: Path
    control_type: str = OPENPOSE
    photo: Path | None = None  # the person's photo (types other than openpose)

    def suffix(self) -> str:
        """The image file's suffix: openpose keeps the name it always had."""
        kind = "" if self.control_type == OPENPOSE else f"-{self.control_type}"
        return f"_pose-{self.image_id}{kind}"


def pose_conditions(
    eval: EvalConfig, pose_dir: str | Path | None, ingest_dir: str | Path | None = None
) -> list[PoseCondition]:
    """The first `eval.pose.skeletons` people of the pose stage, in image_id order, each with
    every control type of `eval.pose.control_types` (people first, then types)."""
    if not eval.pose.enabled:
        return []
    if pose_dir is None:
        raise ConfigError("eval.pose.enabled: the sweep was given no pose folder")
    table = Path(pose_dir) / "keypoints.parquet"
    if not table.is_file():
        raise ConfigError(f"eval.pose.enabled: {table} not found (run the `pose` stage first)")
    rows = pd.read_parquet(table, columns=["image_id", "has_person"])
    people = sorted(rows.loc[rows["has_person"], "image_id"])
    photo_types = [kind for kind in eval.pose.control_types if kind != OPENPOSE]
    if photo_types and ingest_dir is None:
        raise ConfigError(
            f"eval.pose.control_types {photo_types}: the sweep was given no ingest folder (the "
            "photos their maps are made from)"
        )
    conditions = []
    for image_id in people[: eval.pose.skeletons]:
        skeleton = Path(pose_dir) / "skeletons" / f"{image_id}.png"
        if not skeleton.is_file():
            raise ConfigError(f"eval.pose: skeleton {skeleton} not found")
        photo = Path(ingest_dir) / "images" / f"{image_id}.png" if ingest_dir else None
        if photo_types and not photo.is_file():
            raise ConfigError(f"eval.pose.control_types: photo {photo} not found")
        for kind in eval.pose.control_types:
            conditions.append(PoseCondition(image_id, skeleton, kind, photo))
    if not conditions:
        log.warning("eval.pose.enabled, but the pose stage found no person: no pose conditions")
    return conditions


def condition_maps(
    conditions: list[PoseCondition], eval: EvalConfig, out_dir: Path
) -> dict[PoseCondition, Image.Image]:
    """Each condition's control map (RGB); those made from photos are written to
    `out_dir/controls/<id>-<type>.png`."""
    preprocessor = ControlPreprocessor(eval.pose.depth_model)
    maps = {}
    for condition in dict.fromkeys(conditions):
        if condition.control_type == OPENPOSE:
            with Image.open(condition.skeleton) as skeleton:
                maps[condition] = skeleton.convert("RGB")
        else:
            assert condition.photo is not None  # pose_conditions checked it
            with Image.open(condition.photo) as photo:
                maps[condition] = preprocessor(condition.control_type, photo.convert("RGB"))
            # The openpose map is the pose stage's skeleton, already saved there.
            name = f"{condition.image_id}-{condition.control_type}.png"
            write_png(out_dir / CONTROL_DIR / name, maps[condition])
    return maps
