"""Pose: MediaPipe landmarks, a COCO-17 view and OpenPose-style skeleton images.

MediaPipe Pose (0.10.21, models shipped in the wheel; complexity 0 or 1 only, since 2 downloads
its model) finds at most one person per image: 33 landmarks with x, y normalised to 0..1, z and a
visibility. The COCO-17 view picks the matching 17 landmarks in pixel coordinates, the order every
pose metric (OKS, PCK) expects. The skeleton image follows the OpenPose 18-keypoint convention
(neck = midpoint of the shoulders) with its usual limb colours, which ControlNet-openpose reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from charaforge.config import PoseConfig
from charaforge.dedupe import kept_rows
from charaforge.io import atomic_path, write_parquet, write_png

log = logging.getLogger(__name__)

POSE_COLUMNS = ["image_id", "has_person", "landmarks", "coco17", "width", "height"]

# MediaPipe landmark index of each COCO keypoint, in COCO order: nose, eyes, ears, shoulders,
# elbows, wrists, hips, knees, ankles (left before right).
MEDIAPIPE_TO_COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)

# OpenPose BODY-18 keypoints from COCO-17 indices; "neck" is the midpoint of the shoulders.
OPENPOSE_FROM_COCO = (
    ("nose", 0),
    ("neck", None),
    ("r_shoulder", 6),
    ("r_elbow", 8),
    ("r_wrist", 10),
    ("l_shoulder", 5),
    ("l_elbow", 7),
    ("l_wrist", 9),
    ("r_hip", 12),
    ("r_knee", 14),
    ("r_ankle", 16),
    ("l_hip", 11),
    ("l_knee", 13),
    ("l_ankle", 15),
    ("r_eye", 2),
    ("l_eye", 1),
    ("r_ear", 4),
    ("l_ear", 3),
)
# Limbs between OpenPose keypoints and their conventional colours (a hue wheel, red first).
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
OPENPOSE_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


@dataclass
class PoseResult:
    has_person: bool
    landmarks: list[float]  # 33 x [x, y, z, visibility], x/y normalised; empty without a person
    coco17: list[float]  # 17 x [x_px, y_px, visibility]; empty without a person
    width: int
    height: int


class PoseDetector:
    """MediaPipe Pose in static-image mode; use as a context manager to free the graph."""

    def __init__(self, config: PoseConfig) -> None:
        import mediapipe as mp

        self._pose = mp.solutions.pose.Pose(
            static_image_mode=True,
            model_complexity=config.model_complexity,
            min_detection_confidence=config.min_detection_confidence,
        )

    def __enter__(self) -> PoseDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pose.close()

    def detect(self, image: Image.Image) -> PoseResult:
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        height, width = rgb.shape[:2]
        found = self._pose.process(rgb).pose_landmarks
        if found is None:
            return PoseResult(False, [], [], width, height)
        points = np.array([[p.x, p.y, p.z, p.visibility] for p in found.landmark], dtype=np.float64)
        coco = points[list(MEDIAPIPE_TO_COCO17)]
        coco17 = np.stack([coco[:, 0] * width, coco[:, 1] * height, coco[:, 3]], axis=1)
        # Rounded so that the tables do not carry float noise below what a pixel can resolve.
        return PoseResult(
            True,
            np.round(points, 6).ravel().tolist(),
            np.round(coco17, 3).ravel().tolist(),
            width,
            height,
        )


def openpose_keypoints(
    coco17: list[float], min_visibility: float
) -> list[tuple[float, float] | None]:
    """The 18 OpenPose keypoints (pixel x, y) from a COCO-17 view; None where not visible."""
    coco = np.asarray(coco17, dtype=np.float64).reshape(17, 3)
    points: list[tuple[float, float] | None] = []
    for _, index in OPENPOSE_FROM_COCO:
        if index is None:
            shoulders = coco[[5, 6]]
            visible = bool((shoulders[:, 2] >= min_visibility).all())
            points.append(tuple(shoulders[:, :2].mean(axis=0)) if visible else None)
        else:
            visible = coco[index, 2] >= min_visibility
            points.append((coco[index, 0], coco[index, 1]) if visible else None)
    return points


def draw_skeleton(result: PoseResult, min_visibility: float) -> Image.Image:
    """An OpenPose-style skeleton on black, the size of the source image."""
    canvas = Image.new("RGB", (result.width, result.height), (0, 0, 0))
    if not result.has_person:
        return canvas
    draw = ImageDraw.Draw(canvas)
    points = openpose_keypoints(result.coco17, min_visibility)
    width = max(2, round(max(result.width, result.height) / 128))
    for (a, b), colour in zip(OPENPOSE_LIMBS, OPENPOSE_COLOURS, strict=False):
        if points[a] is not None and points[b] is not None:
            # 60 % intensity for limbs, full colour for joints, as OpenPose renders them.
            limb = tuple(int(channel * 0.6) for channel in colour)
            draw.line([points[a], points[b]], fill=limb, width=width)
    radius = width + 1
    for point, colour in zip(points, OPENPOSE_COLOURS, strict=True):
        if point is not None:
            x, y = point
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return canvas


def detect_poses(
    rows: pd.DataFrame, config: PoseConfig
) -> tuple[pd.DataFrame, dict[str, Image.Image]]:
    """Keypoints table and skeleton images (people only) for rows with image_id and image_path."""
    records, skeletons = [], {}
    with PoseDetector(config) as detector:
        for row in rows.itertuples():
            with Image.open(row.image_path) as image:
                result = detector.detect(image)
            records.append(
                {
                    "image_id": row.image_id,
                    "has_person": result.has_person,
                    "landmarks": result.landmarks,
                    "coco17": result.coco17,
                    "width": result.width,
                    "height": result.height,
                }
            )
            if result.has_person:
                skeletons[row.image_id] = draw_skeleton(result, config.min_visibility)
    table = pd.DataFrame(records, columns=POSE_COLUMNS).astype(
        {"has_person": bool, "width": "int64", "height": "int64"}
    )
    return table, skeletons


def pose_folder(
    ingest_dir: str | Path, dedupe_dir: str | Path, out_dir: str | Path, config: PoseConfig
) -> pd.DataFrame:
    """Detect poses on the kept images; write keypoints.parquet and skeletons/<image_id>.png."""
    manifest = pd.read_parquet(Path(ingest_dir) / "manifest.parquet")
    dedupe_table = pd.read_parquet(Path(dedupe_dir) / "dedupe.parquet")
    table, skeletons = detect_poses(kept_rows(manifest, dedupe_table), config)
    with atomic_path(Path(out_dir) / "skeletons") as folder:
        folder.mkdir(parents=True)
        for image_id, skeleton in skeletons.items():
            write_png(folder / f"{image_id}.png", skeleton)
    write_parquet(Path(out_dir) / "keypoints.parquet", table)
    log.info("pose: %d images, %d with a person", len(table), int(table["has_person"].sum()))
    return table
