"""Pose fidelity: OKS / PCK known answers against an independent computation, and the scorer on
real photos (scikit-image's astronaut) with the MediaPipe detector the pipeline uses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from charaforge.config import PoseConfig
from charaforge.evaluate import pose
from charaforge.prepare.pose import PoseDetector

POSE = PoseConfig(backend="mediapipe", model_complexity=1, min_detection_confidence=0.5)
# COCO's published sigmas, typed in again rather than imported.
SIGMAS = [.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087,
          .087, .089, .089]  # fmt: skip


def _independent_oks(predicted: list, reference: list, visible: list) -> float:
    """cocoeval's formulation, written out keypoint by keypoint."""
    xs = [x for (x, _), v in zip(reference, visible, strict=True) if v]
    ys = [y for (_, y), v in zip(reference, visible, strict=True) if v]
    area = max(max(xs) - min(xs), 1.0) * max(max(ys) - min(ys), 1.0)
    total, count = 0.0, 0
    for (px, py), (gx, gy), v, sigma in zip(predicted, reference, visible, SIGMAS, strict=True):
        if not v:
            continue
        variance = (2 * sigma) ** 2
        error = ((px - gx) ** 2 + (py - gy) ** 2) / variance / area / 2
        total += math.exp(-error)
        count += 1
    return total / count


def _skeleton(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20, 180, size=(17, 2))


def _reference(points: np.ndarray, visible: np.ndarray) -> pose.Reference:
    coco17 = np.column_stack([points, np.where(visible, 0.9, 0.1)]).ravel()
    reference = pose.reference_from_coco17(coco17, min_visibility=0.5)
    assert reference is not None
    return reference


def test_sigmas_match_coco() -> None:
    np.testing.assert_allclose(pose.COCO_SIGMAS, SIGMAS)


def test_identical_keypoints_score_one() -> None:
    points = _skeleton(np.random.default_rng(0))
    reference = _reference(points, np.ones(17, bool))
    result = pose.fidelity(points.copy(), reference)
    assert result == {"pose_oks": 1.0, "pose_detected": 1.0, "pose_pck_01": 1.0, "pose_pck_02": 1.0}


@pytest.mark.parametrize("shift", [(3.0, 4.0), (0.0, 12.0), (-7.5, 2.5)])
def test_shifted_keypoints_match_an_independent_oks(shift: tuple[float, float]) -> None:
    rng = np.random.default_rng(1)
    points = _skeleton(rng)
    visible = rng.random(17) > 0.3
    reference = _reference(points, visible)
    predicted = points + np.asarray(shift)
    expected = _independent_oks(predicted.tolist(), points.tolist(), visible.tolist())
    assert pose.oks(predicted, reference) == pytest.approx(expected, rel=1e-12)
    assert 0.0 < expected < 1.0


def test_oks_hand_computed_two_keypoints() -> None:
    """Nose and left eye visible, 10 x 10 box, each 1 px off: exp(-1 / (2 * 100 * (2 sigma)^2))."""
    points = np.zeros((17, 2))
    points[1] = (10.0, 10.0)
    visible = np.zeros(17, bool)
    visible[[0, 1]] = True
    predicted = points.copy()
    predicted[0] += (1.0, 0.0)
    predicted[1] += (0.0, 1.0)
    expected = (math.exp(-1 / (200 * 0.052**2)) + math.exp(-1 / (200 * 0.050**2))) / 2
    assert pose.oks(predicted, _reference(points, visible)) == pytest.approx(expected)


def test_pck_thresholds_at_a_known_distance() -> None:
    points = np.zeros((17, 2))
    points[:, 0] = np.linspace(0, 100, 17)  # bbox 100 x 1: PCK radius = alpha * 100
    points[:, 1] = 50.0
    reference = _reference(points, np.ones(17, bool))
    predicted = points + (0.0, 15.0)  # 15 px: outside 10 px, inside 20 px
    assert pose.pck(predicted, reference, 0.1) == 0.0
    assert pose.pck(predicted, reference, 0.2) == 1.0
    half = points.copy()
    half[::2] += (0.0, 15.0)  # 9 of 17 keypoints off by 15 px
    assert pose.pck(half, reference, 0.1) == pytest.approx(8 / 17)


def test_invisible_keypoints_do_not_count() -> None:
    rng = np.random.default_rng(2)
    points = _skeleton(rng)
    visible = np.ones(17, bool)
    visible[[9, 10]] = False  # wrists hidden
    reference = _reference(points, visible)
    moved = points.copy()
    moved[[9, 10]] += 500.0
    assert pose.fidelity(moved, reference)["pose_oks"] == 1.0
    assert pose.reference_from_coco17(np.zeros(17 * 3), 0.5) is None  # nothing visible


def test_missed_detection_scores_zero() -> None:
    reference = _reference(_skeleton(np.random.default_rng(3)), np.ones(17, bool))
    assert pose.fidelity(None, reference) == {
        "pose_oks": 0.0,
        "pose_pck_01": 0.0,
        "pose_pck_02": 0.0,
        "pose_detected": 0.0,
    }


@pytest.fixture(scope="module")
def photo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source photo with its keypoints (from the pose detector) and three generated images."""
    root = tmp_path_factory.mktemp("pose_repo")
    photo = Image.fromarray(skimage.data.astronaut())
    (root / "data/dataset/images").mkdir(parents=True)
    photo.save(root / "data/dataset/images/astro.png")
    with PoseDetector(POSE) as detector:
        result = detector.detect(photo)
    assert result.has_person
    keypoints = pd.DataFrame(
        [
            {
                "image_id": "astro",
                "has_person": True,
                "landmarks": result.landmarks,
                "coco17": result.coco17,
                "width": result.width,
                "height": result.height,
            }
        ]
    )
    (root / "data/pose").mkdir(parents=True)
    keypoints.to_parquet(root / "data/pose/keypoints.parquet")
    generated = root / "data/generate/images"
    generated.mkdir(parents=True)
    photo.resize((256, 256), Image.Resampling.BICUBIC).save(generated / "faithful.png")
    Image.new("RGB", (256, 256), (90, 90, 90)).save(generated / "blank.png")
    photo.resize((256, 256)).save(generated / "unconditioned.png")
    return root


def _index(root: Path, with_pose: bool = True) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "image_path": [
                "data/generate/images/faithful.png",
                "data/generate/images/blank.png",
                "data/generate/images/unconditioned.png",
            ],
            "pose_image_id": ["astro", "astro", None],
        }
    )
    return frame if with_pose else frame.drop(columns=["pose_image_id"])


def test_pose_fidelity_on_real_photos(photo_repo: Path) -> None:
    keypoints = pd.read_parquet(photo_repo / "data/pose/keypoints.parquet")
    sources = {"astro": photo_repo / "data/dataset/images/astro.png"}
    result = pose.score_pose_fidelity(_index(photo_repo), keypoints, sources, photo_repo, POSE)
    assert result.applicable and result.n_conditioned == 2
    faithful, blank, unconditioned = (result.per_image.iloc[i] for i in range(3))
    assert faithful["pose_detected"] == 1.0 and faithful["pose_oks"] > 0.8
    assert faithful["pose_pck_02"] >= faithful["pose_pck_01"]
    assert blank.tolist() == [0.0, 0.0, 0.0, 0.0]  # no person: a failed pose, not an error
    assert unconditioned.isna().all()  # not conditioned: not applicable
    # The ceiling is the same detector on the source photo at the generated size: here the
    # faithful image is that very resize, so it scores the ceiling.
    assert result.ceiling is not None and result.ceiling["n_photos"] == 1
    for name in pose.POSE_METRICS:
        assert result.ceiling[name] == pytest.approx(faithful[name], abs=1e-6)


def test_pose_fidelity_without_the_contract_columns_is_not_applicable(photo_repo: Path) -> None:
    keypoints = pd.read_parquet(photo_repo / "data/pose/keypoints.parquet")
    result = pose.score_pose_fidelity(
        _index(photo_repo, with_pose=False), keypoints, {}, photo_repo, POSE
    )
    assert not result.applicable and "pose_image_id" in result.reason
    assert result.per_image.isna().all().all() and len(result.per_image) == 3
    no_table = pose.score_pose_fidelity(_index(photo_repo), None, {}, photo_repo, POSE)
    assert not no_table.applicable and "keypoints" in no_table.reason
