"""Pose fidelity: does a pose-conditioned image show the pose it was conditioned on?

The pose detector (`prepare.pose.PoseDetector`, the one that made the conditioning skeleton)
runs on the generated image; its COCO-17 keypoints are compared with the conditioning keypoints,
scaled from the source photo to the generated image's size (the skeleton image is resized the
same way before conditioning):

- OKS (COCO object keypoint similarity) with the COCO per-keypoint sigmas, over the keypoints
  visible in the conditioning pose; the object area is the area of their bounding box.
- PCK@a: the share of those keypoints within a x max(bbox width, bbox height) pixels.
- detection rate: the share of pose-conditioned images in which a person is found at all; an
  image with no person scores OKS 0 and PCK 0 (a missed pose is a failed pose).

The same detector on the source photo, resized to the generated size, gives the ceiling: what a
generator that reproduced the photo exactly would score, i.e. the detector's own noise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from charaforge.config import PoseConfig
from charaforge.evaluate.columns import POSE_COLUMNS, FamilyScores, resolve_image_path
from charaforge.prepare.pose import PoseDetector

log = logging.getLogger(__name__)

# COCO keypoint sigmas (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles).
COCO_SIGMAS = (
    np.array(
        [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62,
         1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
    )
    / 10.0
)  # fmt: skip
POSE_METRICS = POSE_COLUMNS
PCK_ALPHAS = {"pose_pck_01": 0.1, "pose_pck_02": 0.2}


@dataclass(frozen=True)
class Reference:
    """Conditioning keypoints (17 x 2 pixels) and which of them count (visible enough)."""

    points: np.ndarray
    visible: np.ndarray

    @property
    def bbox(self) -> tuple[float, float]:
        """Width and height of the visible keypoints' bounding box (at least one pixel each)."""
        visible = self.points[self.visible]
        span = visible.max(axis=0) - visible.min(axis=0)
        return max(float(span[0]), 1.0), max(float(span[1]), 1.0)


def reference_from_coco17(
    coco17: Iterable[float], min_visibility: float, scale: tuple[float, float] = (1.0, 1.0)
) -> Reference | None:
    """A Reference from a COCO-17 view (17 x [x, y, visibility]); None with < 2 visible points."""
    array = np.asarray(list(coco17), dtype=np.float64)
    if array.size != 17 * 3:
        return None
    array = array.reshape(17, 3)
    visible = array[:, 2] >= min_visibility
    if visible.sum() < 2:
        return None
    points = array[:, :2] * np.asarray(scale, dtype=np.float64)
    return Reference(points=points, visible=visible)


def oks(predicted: np.ndarray, reference: Reference) -> float:
    """COCO OKS: mean over visible keypoints of exp(-d^2 / (2 s^2 k^2)), s^2 = area, k = 2 sigma."""
    width, height = reference.bbox
    area = width * height
    squared = ((np.asarray(predicted, np.float64) - reference.points) ** 2).sum(axis=1)
    k_squared = (2.0 * COCO_SIGMAS) ** 2
    similarity = np.exp(-squared / (2.0 * area * k_squared))
    return float(similarity[reference.visible].mean())


def pck(predicted: np.ndarray, reference: Reference, alpha: float) -> float:
    """Share of visible keypoints within alpha x max(bbox width, height) of the reference."""
    distances = np.linalg.norm(np.asarray(predicted, np.float64) - reference.points, axis=1)
    threshold = alpha * max(reference.bbox)
    return float((distances[reference.visible] <= threshold).mean())


def fidelity(predicted: np.ndarray | None, reference: Reference) -> dict[str, float]:
    """All pose metrics of one image; `predicted` None means no person was detected."""
    if predicted is None:
        return {"pose_oks": 0.0, "pose_pck_01": 0.0, "pose_pck_02": 0.0, "pose_detected": 0.0}
    result = {"pose_oks": oks(predicted, reference), "pose_detected": 1.0}
    for name, alpha in PCK_ALPHAS.items():
        result[name] = pck(predicted, reference, alpha)
    return result


def _detected_points(detector: object, image: Image.Image) -> np.ndarray | None:
    result = detector.detect(image)  # type: ignore[attr-defined]
    if not result.has_person:
        return None
    return np.asarray(result.coco17, dtype=np.float64).reshape(17, 3)[:, :2]


def _empty_metrics(length: int) -> dict[str, np.ndarray]:
    return {name: np.full(length, np.nan) for name in POSE_METRICS}


@dataclass
class PoseFidelityResult:
    per_image: pd.DataFrame  # one row per index row: POSE_METRICS, NaN where not applicable
    ceiling: dict[str, float] | None  # mean of each metric on the source photos
    n_conditioned: int
    applicable: bool
    reason: str


def score_pose_fidelity(
    index: pd.DataFrame,
    keypoints: pd.DataFrame | None,
    source_paths: dict[str, Path],
    root: Path,
    config: PoseConfig,
) -> PoseFidelityResult:
    """Pose metrics for every index row whose `pose_image_id` names a conditioning pose.

    Rows without `pose_image_id` (or with a null one) get NaN: not applicable, not a failure.
    """
    metrics = _empty_metrics(len(index))
    frame = lambda: pd.DataFrame(metrics, index=index.index)  # noqa: E731
    if "pose_image_id" not in index.columns:
        return PoseFidelityResult(frame(), None, 0, False, "the sweep has no pose_image_id column")
    conditioned = index["pose_image_id"].notna()
    if not conditioned.any():
        reason = "no image of the sweep is pose-conditioned"
        return PoseFidelityResult(frame(), None, 0, False, reason)
    if keypoints is None:
        return PoseFidelityResult(
            frame(), None, 0, False, "no keypoints table for the conditioning poses"
        )
    by_id = keypoints.drop_duplicates("image_id").set_index("image_id")

    ceiling_rows: dict[tuple[str, int, int], dict[str, float]] = {}
    n_conditioned = 0
    with PoseDetector(config) as detector:
        for position, (pose_id, image_path) in enumerate(
            zip(index["pose_image_id"], index["image_path"], strict=True)
        ):
            if not isinstance(pose_id, str) or pose_id not in by_id.index:
                if isinstance(pose_id, str):
                    log.warning("pose fidelity: conditioning pose %s not in keypoints", pose_id)
                continue
            source = by_id.loc[pose_id]
            if not bool(source["has_person"]):
                continue
            with Image.open(root / image_path) as opened:
                image = opened.convert("RGB")
            scale = (image.width / float(source["width"]), image.height / float(source["height"]))
            reference = reference_from_coco17(source["coco17"], config.min_visibility, scale)
            if reference is None:
                continue
            n_conditioned += 1
            for name, value in fidelity(_detected_points(detector, image), reference).items():
                metrics[name][position] = value
            key = (pose_id, image.width, image.height)
            if key not in ceiling_rows and pose_id in source_paths:
                with Image.open(source_paths[pose_id]) as opened:
                    photo = opened.convert("RGB").resize(image.size, Image.Resampling.BICUBIC)
                ceiling_rows[key] = fidelity(_detected_points(detector, photo), reference)
    if n_conditioned == 0:
        return PoseFidelityResult(
            frame(), None, 0, False, "no conditioning pose has a visible person"
        )
    ceiling = None
    if ceiling_rows:
        table = pd.DataFrame(list(ceiling_rows.values()))
        ceiling = {name: round(float(table[name].mean()), 6) for name in POSE_METRICS}
        ceiling["n_photos"] = len(ceiling_rows)
    return PoseFidelityResult(frame(), ceiling, n_conditioned, True, "")


def score_poses(
    index: pd.DataFrame,
    pose_dir: str | Path | None,
    config: PoseConfig | None,
    metadata: pd.DataFrame,
    root: Path,
) -> FamilyScores:
    """Pose fidelity of the sweep's pose-conditioned images against the pose stage's keypoints.

    `metadata` (the dataset table) locates the source photos, whose poses give the ceiling.
    """
    keypoints = None
    if pose_dir is not None and (Path(pose_dir) / "keypoints.parquet").is_file():
        keypoints = pd.read_parquet(Path(pose_dir) / "keypoints.parquet")
    columns: dict[str, np.ndarray]
    if config is None:
        columns = {name: np.full(len(index), np.nan) for name in POSE_METRICS}
        reason, applicable, ceiling, n_conditioned = "no pose configuration", False, None, 0
    else:
        sources = {
            row.image_id: resolve_image_path(root, row.image_path) for row in metadata.itertuples()
        }
        result = score_pose_fidelity(index, keypoints, sources, root, config)
        columns = {name: result.per_image[name].to_numpy() for name in POSE_METRICS}
        reason, applicable = result.reason, result.applicable
        ceiling, n_conditioned = result.ceiling, result.n_conditioned
    if not applicable:
        log.info("pose fidelity not applicable: %s", reason)
    common: dict[str, Any] = {
        "model": "MediaPipe Pose (charaforge.prepare.pose.PoseDetector, COCO-17 view)",
        "stand_in": False,
        "applicable": applicable,
        "reason": reason,
        "conditioned_images": n_conditioned,
        "ceiling": ceiling,
        "preprocessing": "conditioning keypoints scaled from the source photo to the generated "
        "size; keypoints below pose.min_visibility are left out",
    }
    records = {
        "pose_oks": {
            **common,
            "scale": "OKS, 0..1",
            "definition": "COCO OKS with COCO sigmas against the conditioning keypoints; object "
            "area = their bounding-box area; 0 when no person is detected",
        },
        "pose_pck_01": {
            **common,
            "scale": "share of keypoints, 0..1",
            "definition": "PCK@0.1 of max(bbox width, height) of the conditioning keypoints",
        },
        "pose_pck_02": {
            **common,
            "scale": "share of keypoints, 0..1",
            "definition": "PCK@0.2 of max(bbox width, height) of the conditioning keypoints",
        },
        "pose_detected": {
            **common,
            "scale": "share of images, 0..1",
            "definition": "1 when the detector finds a person in the pose-conditioned image",
        },
    }
    return FamilyScores(columns=columns, records=records)
