"""ArcFace identity: detection (MediaPipe Face Mesh), 5-point alignment, recognition (insightface).

Real components only: the scikit-image astronaut photo (a real face), the detector model that
ships in the mediapipe wheel, and the stand-in recognition ONNX loaded through insightface's own
`get_model`, checked against onnxruntime run directly with ArcFace's preprocessing.
"""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import skimage.data
from PIL import Image

from charaforge.config import FaceConfig
from charaforge.errors import ConfigError
from charaforge.models import face


@pytest.fixture(scope="module")
def scorer() -> face.FaceScorer:
    with face.load_face_scorer(FaceConfig()) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def test_stand_in_onnx_is_deterministic_and_has_arcface_signature() -> None:
    first = face.build_stand_in_recognizer(0)
    assert first == face.build_stand_in_recognizer(0)
    assert first != face.build_stand_in_recognizer(1)
    session = onnxruntime.InferenceSession(first, providers=["CPUExecutionProvider"])
    (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
    assert inputs.name == "data" and inputs.shape[1:] == [3, 112, 112]
    assert outputs.shape[1:] == [face.EMBEDDING_DIM]


def test_insightface_routes_the_stand_in_as_recognition(scorer: face.FaceScorer) -> None:
    model = scorer.recognizer
    assert type(model).__name__ == "ArcFaceONNX" and model.taskname == "recognition"
    # ArcFace normalisation, not the MXNet export's identity one.
    assert (model.input_mean, model.input_std) == (127.5, 127.5)
    assert scorer.stand_in is True
    assert scorer.description["model"] == face.STAND_IN_NAME
    assert "MediaPipe" in scorer.description["detector"]


def test_embedding_uses_rgb_and_arcface_normalisation(scorer: face.FaceScorer) -> None:
    """Known answer: onnxruntime on (x - 127.5) / 127.5 of the RGB crop, NCHW, normalised."""
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    session = onnxruntime.InferenceSession(
        face.build_stand_in_recognizer(0), providers=["CPUExecutionProvider"]
    )
    blob = (np.stack(crops).astype(np.float32) - 127.5) / 127.5
    expected = session.run(None, {"data": blob.transpose(0, 3, 1, 2)})[0].astype(np.float64)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(scorer.embed_aligned(crops), expected, atol=1e-5)
    # Channel order matters: the BGR crop gives another embedding.
    swapped = scorer.embed_aligned([crops[0][:, :, ::-1]])
    assert float(swapped[0] @ expected[0]) < 0.999


def test_alignment_onto_the_template_is_the_identity() -> None:
    """Landmarks already at the ArcFace template positions: norm_crop returns the top-left crop."""
    from insightface.utils.face_align import arcface_dst

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    aligned = face.align_face(image, arcface_dst)
    assert aligned.shape == (112, 112, 3)
    np.testing.assert_array_equal(aligned, image[:112, :112])


def test_detects_five_ordered_landmarks_on_a_real_face(
    scorer: face.FaceScorer, astronaut: Image.Image
) -> None:
    faces = scorer.detector.detect(np.asarray(astronaut))
    assert len(faces) == 1
    kps = faces[0].kps
    left_eye, right_eye, nose, mouth_left, mouth_right = kps
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    x1, y1, x2, y2 = faces[0].bbox
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in kps)


def test_identity_known_answers(scorer: face.FaceScorer, astronaut: Image.Image) -> None:
    blank = Image.new("RGB", (96, 96), (200, 200, 200))
    images = [astronaut, astronaut.copy(), blank, astronaut.transpose(Image.FLIP_LEFT_RIGHT)]
    embeddings = scorer.embed_images(images)
    found = ~np.isnan(embeddings).any(axis=1)
    assert found.tolist() == [True, True, False, True]  # the blank image is counted, not an error
    reference = face.reference_embedding(embeddings[:1])
    identity = face.identity_scores(embeddings, reference)
    assert identity[0] == pytest.approx(1.0, abs=1e-9)
    assert identity[1] == pytest.approx(1.0, abs=1e-9)
    assert np.isnan(identity[2])
    assert identity[3] < 1.0 - 1e-3  # another crop gives another embedding
    # A permuted batch gives the permuted embeddings.
    order = [3, 0, 2, 1]
    permuted = scorer.embed_images([images[i] for i in order])
    np.testing.assert_allclose(permuted, embeddings[order], atol=1e-6)


def test_no_face_in_the_references_gives_no_reference() -> None:
    assert face.reference_embedding(np.full((3, face.EMBEDDING_DIM), np.nan)) is None
    assert np.isnan(face.identity_scores(np.ones((2, face.EMBEDDING_DIM)), None)).all()


def test_missing_model_files_fail_clearly(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="score.face.recognition_path.*not found"):
        face.load_face_scorer(
            FaceConfig(recognition="pretrained", recognition_path=str(tmp_path / "w600k.onnx"))
        )
    with pytest.raises(ValueError, match="recognition_path"):
        FaceConfig(recognition="pretrained")


def test_pretrained_recognition_loads_a_local_onnx(tmp_path, astronaut: Image.Image) -> None:  # noqa: ANN001
    """The pretrained path on a local file (the stand-in's bytes): same numbers, not a stand-in."""
    path = tmp_path / "w600k_like.onnx"
    path.write_bytes(face.build_stand_in_recognizer(0))
    config = FaceConfig(recognition="pretrained", recognition_path=str(path))
    with face.load_face_scorer(config) as loaded, face.load_face_scorer(FaceConfig()) as stand_in:
        assert loaded.stand_in is False and loaded.description["model"] == path.name
        np.testing.assert_allclose(
            loaded.embed_images([astronaut]), stand_in.embed_images([astronaut]), atol=1e-9
        )


def test_consistency_filter_sets_aside_without_deleting(tmp_path, astronaut: Image.Image) -> None:  # noqa: ANN001
    from charaforge.evaluate import consistency

    reference = tmp_path / "reference.png"
    astronaut.save(reference)
    batch = tmp_path / "batch"
    batch.mkdir()
    astronaut.save(batch / "a_same.png")
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(batch / "b_mirror.png")
    Image.new("RGB", (96, 96), (200, 200, 200)).save(batch / "c_blank.png")
    (batch / "c_blank.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in batch.iterdir()}
    # The mirror scores ~0.75 with the stand-in (see test_identity_known_answers): under 0.99.
    table = consistency.filter_folder(batch, [reference], FaceConfig(identity_threshold=0.99))
    assert table["file"].tolist() == ["a_same.png", "b_mirror.png", "c_blank.png"]
    assert table["kept"].tolist() == [True, False, False]
    assert table["face_found"].tolist() == [True, True, False]
    assert table.loc[0, "identity"] == pytest.approx(1.0, abs=1e-6)
    assert sorted(p.name for p in batch.glob("*.png")) == ["a_same.png"]
    aside = batch / consistency.SET_ASIDE
    assert sorted(p.name for p in aside.iterdir()) == [
        "b_mirror.png",
        "c_blank.json",
        "c_blank.png",
    ]
    # Nothing lost: every file is still there, byte for byte, in one of the two places.
    for name, data in before.items():
        assert ((batch / name) if (batch / name).exists() else (aside / name)).read_bytes() == data
    written = (batch / "consistency.csv").read_text().splitlines()
    assert written[0] == "file,identity,face_found,kept,location"
    assert written[2].endswith("set_aside/b_mirror.png")
    # A rerun considers only what is still in the folder, and keeps it.
    again = consistency.filter_folder(batch, [reference], FaceConfig(identity_threshold=0.99))
    assert again["file"].tolist() == ["a_same.png"] and again["kept"].all()
