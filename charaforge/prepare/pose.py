"""Pose: MediaPipe landmarks, COCO-17 and OpenPose-18 views, OpenPose-style skeleton images.

MediaPipe Pose (0.10.21, models shipped in the wheel; complexity 0 or 1 only, since 2 downloads
its model) finds at most one person per image: 33 landmarks with x, y normalised to 0..1, z and a
visibility. The COCO-17 view picks the matching 17 landmarks in pixel coordinates, the order every
pose metric (OKS, PCK) expects. The skeleton image follows the OpenPose 18-keypoint convention
(neck = midpoint of the shoulders) with its usual limb colours, which ControlNet-openpose reads;
the OpenPose-18 view is also stored as numbers (keypoints.parquet `openpose18`) and as OpenPose's
own JSON format (`openpose/<image_id>.json`), which pose editors read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from charaforge.config import PoseConfig
from charaforge.core.contracts import kept_rows
from charaforge.core.files import atomic_path, write_json, write_parquet, write_png
from charaforge.core.logs import NativeNoiseFilter
from charaforge.core.progress import progress

log = logging.getLogger(__name__)

POSE_COLUMNS = ["image_id", "has_person", "landmarks", "coco17", "width", "height", "openpose18"]

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

    def openpose18(self, min_visibility: float = 0.0) -> list[float]:
        """The OpenPose BODY-18 view: 18 x [x_px, y_px, confidence]; empty without a person.

        Keypoints below `min_visibility` are written as 0, 0, 0, which is how OpenPose marks a
        keypoint it did not find. The neck's confidence is the lower of the two shoulders'.
        """
        if not self.has_person:
            return []
        return openpose18_from_coco(self.coco17, min_visibility)

    def openpose_json(self, min_visibility: float = 0.0) -> dict:
        """OpenPose's JSON output format (version 1.3), which pose editors and ControlNet tools
        read: one person, `pose_keypoints_2d` as flat x, y, confidence triples, and the canvas
        size the keypoints' pixels refer to.

        Kept keypoints carry confidence 1.0: sd-webui-controlnet's reader (and the editors built
        on it) drops every keypoint whose confidence is below 1.0, so MediaPipe's visibilities
        would lose most of them. The visibilities stay in the keypoints table (`openpose18`).
        """
        people = []
        if self.has_person:
            rows = np.asarray(self.openpose18(min_visibility), dtype=np.float64).reshape(18, 3)
            rows[rows[:, 2] > 0, 2] = 1.0
            people.append({"person_id": [-1], "pose_keypoints_2d": rows.ravel().tolist()})
        return {
            "version": 1.3,
            "people": people,
            "canvas_width": self.width,
            "canvas_height": self.height,
        }


class PoseDetector:
    """MediaPipe Pose in static-image mode; use as a context manager to free the graph."""

    def __init__(self, config: PoseConfig) -> None:
        import mediapipe as mp

        # MediaPipe's C++ graph writes its start-up notes to fd 2 from its own threads.
        self._quiet = NativeNoiseFilter().open()
        self._pose = mp.solutions.pose.Pose(
            static_image_mode=True,
            model_complexity=config.model_complexity,
            min_detection_confidence=config.min_detection_confidence,
        )

    def __enter__(self) -> PoseDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pose.close()
        self._quiet.close()

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


def openpose18_from_coco(coco17: list[float], min_visibility: float = 0.0) -> list[float]:
    """18 x [x_px, y_px, confidence] in OpenPose order from a COCO-17 view; 0, 0, 0 if unseen."""
    coco = np.asarray(coco17, dtype=np.float64).reshape(17, 3)
    rows = []
    for _, index in OPENPOSE_FROM_COCO:
        if index is None:
            shoulders = coco[[5, 6]]
            point = [*shoulders[:, :2].mean(axis=0), shoulders[:, 2].min()]
        else:
            point = list(coco[index])
        rows.append(point if point[2] >= min_visibility and point[2] > 0 else [0.0, 0.0, 0.0])
    return np.round(np.asarray(rows, dtype=np.float64), 3).ravel().tolist()


def draw_skeleton(
    result: PoseResult, min_visibility: float, size: tuple[int, int] | None = None
) -> Image.Image:
    """An OpenPose-style skeleton on black: ControlNet-openpose conditioning.

    Drawn the way OpenPose (and the ControlNet annotator) renders BODY-18: each limb a filled
    ellipse in its limb colour at 60 % intensity, each keypoint a disc in its keypoint colour on
    top, stick width 4 px at 512 px and scaled with the canvas. `size` renders at another
    resolution (e.g. the generation resolution), coordinates scaled, aspect ratio the caller's.
    """
    width, height = size or (result.width, result.height)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    if not result.has_person:
        return canvas
    scale_x, scale_y = width / result.width, height / result.height
    points = [
        None if point is None else (point[0] * scale_x, point[1] * scale_y)
        for point in openpose_keypoints(result.coco17, min_visibility)
    ]
    stick = max(1.0, 4.0 * max(width, height) / 512)
    draw = ImageDraw.Draw(canvas)
    for (a, b), colour in zip(OPENPOSE_LIMBS, OPENPOSE_COLOURS, strict=False):
        if points[a] is None or points[b] is None:
            continue
        limb = tuple(int(channel * 0.6) for channel in colour)
        draw.polygon(_limb_polygon(points[a], points[b], stick), fill=limb)
    radius = stick
    for point, colour in zip(points, OPENPOSE_COLOURS, strict=True):
        if point is not None:
            x, y = point
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return canvas


def _limb_polygon(
    a: tuple[float, float], b: tuple[float, float], half_width: float, vertices: int = 36
) -> list[tuple[float, float]]:
    """The ellipse spanning a to b with the given half width, as a polygon."""
    centre = np.add(a, b) / 2
    half_length = float(np.hypot(b[0] - a[0], b[1] - a[1])) / 2
    angle = np.arctan2(b[1] - a[1], b[0] - a[0])
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    x, y = half_length * np.cos(t), half_width * np.sin(t)
    cos, sin = np.cos(angle), np.sin(angle)
    return [
        (float(centre[0] + cos * u - sin * v), float(centre[1] + sin * u + cos * v))
        for u, v in zip(x, y, strict=True)
    ]


def compact(values: list[float]) -> np.ndarray | list:
    """A float64 array for a non-empty list: ~8 bytes a number instead of a list's ~32, so
    20k images' keypoints are ~40 MB, not ~150 MB; the same parquet bytes (an all-empty column
    stays lists, which arrow types as it always did)."""
    return np.asarray(values, dtype=np.float64) if len(values) else []


def iter_poses(rows: pd.DataFrame, config: PoseConfig) -> Iterator[tuple[dict, PoseResult]]:
    """(keypoints table record, result) per row with image_id and image_path, in row order; one
    image decoded at a time, so a folder of any size costs the memory of one image."""
    with PoseDetector(config) as detector:
        for row in progress(rows.itertuples(), len(rows), "pose"):
            with Image.open(row.image_path) as image:
                result = detector.detect(image)
            record = {
                "image_id": row.image_id,
                "has_person": result.has_person,
                "landmarks": compact(result.landmarks),
                "coco17": compact(result.coco17),
                "width": result.width,
                "height": result.height,
                "openpose18": compact(result.openpose18(config.min_visibility)),
            }
            yield record, result


def keypoints_table(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=POSE_COLUMNS).astype(
        {"has_person": bool, "width": "int64", "height": "int64"}
    )


def detect_poses(
    rows: pd.DataFrame, config: PoseConfig
) -> tuple[pd.DataFrame, dict[str, Image.Image]]:
    """Keypoints table and skeleton images (people only) for rows with image_id and image_path.

    The OpenPose JSON documents of the people found are in `table.attrs["openpose"]`. Holds every
    skeleton in memory: for small sets (tests, evaluation); `pose_folder` streams to disk.
    """
    records, skeletons, openpose = [], {}, {}
    for record, result in iter_poses(rows, config):
        records.append(record)
        if result.has_person:
            skeletons[record["image_id"]] = draw_skeleton(result, config.min_visibility)
            openpose[record["image_id"]] = result.openpose_json(config.min_visibility)
    table = keypoints_table(records)
    table.attrs["openpose"] = openpose
    return table, skeletons


def pose_folder(
    ingest_dir: str | Path, dedupe_dir: str | Path, out_dir: str | Path, config: PoseConfig
) -> pd.DataFrame:
    """Detect poses on the kept images; write keypoints.parquet and skeletons/<image_id>.png.

    Each skeleton and OpenPose document is written as soon as its image is done (both folders
    swapped in at the end), so memory does not grow with the folder.
    """
    manifest = pd.read_parquet(Path(ingest_dir) / "manifest.parquet")
    dedupe_table = pd.read_parquet(Path(dedupe_dir) / "dedupe.parquet")
    records = []
    with (
        atomic_path(Path(out_dir) / "skeletons") as skeletons,
        atomic_path(Path(out_dir) / "openpose") as documents,
    ):
        skeletons.mkdir(parents=True)
        documents.mkdir(parents=True)
        for record, result in iter_poses(kept_rows(manifest, dedupe_table), config):
            records.append(record)
            if result.has_person:
                image_id = record["image_id"]
                write_png(
                    skeletons / f"{image_id}.png", draw_skeleton(result, config.min_visibility)
                )
                write_json(
                    documents / f"{image_id}.json", result.openpose_json(config.min_visibility)
                )
    table = keypoints_table(records)
    write_parquet(Path(out_dir) / "keypoints.parquet", table)
    log.info("pose: %d images, %d with a person", len(table), int(table["has_person"].sum()))
    return table
