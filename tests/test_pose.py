"""Pose on real photos (scikit-image's astronaut and camera man) with MediaPipe's shipped model:
the 33 landmarks, the COCO-17 and OpenPose-18 views, OpenPose JSON, and skeleton images drawn
in the OpenPose colour convention that ControlNet-openpose was trained on.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from charaforge.config import PoseConfig
from charaforge.prepare import pose

CONFIG = PoseConfig(backend="mediapipe", model_complexity=1, min_detection_confidence=0.5)


@pytest.fixture(scope="module")
def results() -> dict[str, pose.PoseResult]:
    photos = {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "camera": Image.fromarray(skimage.data.camera()).convert("RGB"),
        "coffee": Image.fromarray(skimage.data.coffee()),  # a cup of coffee: nobody
        "flat": Image.new("RGB", (200, 120), (90, 140, 200)),
    }
    with pose.PoseDetector(CONFIG) as detector:
        return {name: detector.detect(image) for name, image in photos.items()}


def test_people_are_found_and_nobody_is_recorded_as_such(results: dict) -> None:
    for name in ("astronaut", "camera"):
        found = results[name]
        assert found.has_person, name
        landmarks = np.asarray(found.landmarks).reshape(33, 4)
        assert ((landmarks[:, 3] >= 0) & (landmarks[:, 3] <= 1)).all()  # visibility
    for name in ("coffee", "flat"):
        nobody = results[name]
        assert not nobody.has_person and nobody.coco17 == [] and nobody.openpose18() == []
        assert nobody.openpose_json()["people"] == []
        assert not np.asarray(pose.draw_skeleton(nobody, 0.5)).any()


def test_coco17_and_openpose18_views_agree_with_the_landmarks(results: dict) -> None:
    found = results["astronaut"]
    landmarks = np.asarray(found.landmarks).reshape(33, 4)
    coco = np.asarray(found.coco17).reshape(17, 3)
    for coco_index, mediapipe_index in enumerate(pose.MEDIAPIPE_TO_COCO17):
        expected = landmarks[mediapipe_index]
        np.testing.assert_allclose(coco[coco_index, 0], expected[0] * found.width, atol=1e-2)
        np.testing.assert_allclose(coco[coco_index, 1], expected[1] * found.height, atol=1e-2)
        np.testing.assert_allclose(coco[coco_index, 2], expected[3], atol=1e-3)  # rounded to 3
    openpose = np.asarray(found.openpose18()).reshape(18, 3)
    names = [name for name, _ in pose.OPENPOSE_FROM_COCO]
    for name, coco_index in pose.OPENPOSE_FROM_COCO:
        if coco_index is not None:
            np.testing.assert_allclose(openpose[names.index(name)], coco[coco_index], atol=1e-3)
    neck = openpose[names.index("neck")]
    np.testing.assert_allclose(neck[:2], coco[[5, 6], :2].mean(axis=0), atol=1e-3)
    assert neck[2] == pytest.approx(coco[[5, 6], 2].min(), abs=1e-3)
    # The astronaut faces the camera: her right shoulder is on the image's left.
    assert openpose[names.index("r_shoulder"), 0] < openpose[names.index("l_shoulder"), 0]
    document = found.openpose_json()
    assert document["canvas_width"] == 512 and len(document["people"]) == 1
    written = np.asarray(document["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    np.testing.assert_array_equal(written[:, :2], openpose[:, :2])
    # Kept keypoints say 1.0 (ControlNet's reader), the table keeps MediaPipe's visibility.
    np.testing.assert_array_equal(written[:, 2], (openpose[:, 2] > 0).astype(float))
    assert 0 < openpose[openpose[:, 2] > 0, 2].min() < 1.0


def _controlnet_reader(document: dict) -> list[list[tuple[float, float] | None]]:
    """What sd-webui-controlnet's `decode_json_as_poses` keeps of an OpenPose JSON: per person,
    a keypoint only where its confidence is 1.0 (pixel coordinates over the canvas size)."""
    width, height = document["canvas_width"], document["canvas_height"]
    people = []
    for person in document.get("people", []):
        numbers = person["pose_keypoints_2d"]
        triples = [numbers[i : i + 3] for i in range(0, len(numbers), 3)]
        people.append([(x / width, y / height) if c >= 1.0 else None for x, y, c in triples])
    return people


@pytest.mark.parametrize("name", ["astronaut", "camera"])
def test_controlnet_json_reader_keeps_every_detected_keypoint(results: dict, name: str) -> None:
    found = results[name]
    document = found.openpose_json(CONFIG.min_visibility)
    assert (document["canvas_width"], document["canvas_height"]) == (found.width, found.height)
    (kept,) = _controlnet_reader(document)
    detected = np.asarray(found.openpose18(CONFIG.min_visibility)).reshape(18, 3)
    expected = [(x / found.width, y / found.height) if c > 0 else None for x, y, c in detected]
    assert kept == expected
    assert sum(point is not None for point in kept) >= 5, name


def test_openpose18_marks_unseen_keypoints_with_zeros() -> None:
    coco = np.zeros((17, 3))
    coco[:, :2] = np.arange(34).reshape(17, 2)
    coco[:, 2] = 0.9
    coco[16, 2] = 0.1  # right ankle barely visible
    rows = np.asarray(pose.openpose18_from_coco(coco.ravel().tolist(), 0.5)).reshape(18, 3)
    assert rows[10].tolist() == [0.0, 0.0, 0.0]  # OpenPose r_ankle
    assert rows[13].tolist() == coco[15].tolist()  # OpenPose l_ankle is COCO 15


def test_skeleton_follows_the_openpose_colour_convention(results: dict) -> None:
    found = results["astronaut"]
    skeleton = np.asarray(pose.draw_skeleton(found, 0.5))
    assert skeleton.shape == (512, 512, 3)
    points = pose.openpose_keypoints(found.coco17, 0.5)
    visible = [k for k, point in enumerate(points) if point is not None]
    assert {1, 2, 5} <= set(visible)  # neck and shoulders (the photo ends above the hips)

    def colour_at(point: tuple[float, float]) -> tuple[int, ...]:
        return tuple(int(c) for c in skeleton[round(point[1]), round(point[0])])

    # Joints are discs in their keypoint colour (face keypoints may overlap each other).
    exact = [k for k in visible if colour_at(points[k]) == pose.OPENPOSE_COLOURS[k]]
    assert {1, 2, 5} <= set(exact) and len(exact) >= 0.8 * len(visible)
    # Limbs are drawn at 60 % of their colour: neck -> right shoulder is limb 0 (red).
    middle = np.add(points[1], points[2]) / 2
    assert colour_at(tuple(middle)) == (153, 0, 0)
    # Only OpenPose colours (and black) appear: nothing else to confuse the ControlNet.
    palette = {(0, 0, 0)} | set(pose.OPENPOSE_COLOURS)
    palette |= {tuple(int(c * 0.6) for c in colour) for colour in pose.OPENPOSE_COLOURS}
    colours = {tuple(c) for c in skeleton.reshape(-1, 3)}
    assert colours <= palette


def test_skeleton_renders_at_a_conditioning_resolution(results: dict) -> None:
    found = results["camera"]
    small = np.asarray(pose.draw_skeleton(found, 0.5, size=(64, 64)))
    assert small.shape == (64, 64, 3) and small.any()
    points = pose.openpose_keypoints(found.coco17, 0.5)
    neck = points[1]
    assert neck is not None
    x, y = round(neck[0] * 64 / found.width), round(neck[1] * 64 / found.height)
    assert tuple(small[y, x]) == pose.OPENPOSE_COLOURS[1]
