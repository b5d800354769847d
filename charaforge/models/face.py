"""ArcFace identity: face detection, 5-point alignment, recognition embedding, cosine.

Detection gives five landmarks in the ArcFace order (the eye on the image's left, the other eye,
the nose tip, the left and right mouth corners). insightface's own detector (SCRFD / RetinaFace)
is used when its ONNX file is present locally; otherwise MediaPipe Face Mesh, whose model ships in
the mediapipe 0.10.21 wheel, gives the landmarks (eye centres from the eye corners, nose tip,
mouth corners). `insightface.utils.face_align.norm_crop` warps each face onto the ArcFace template
at 112x112, and the recognition model (`insightface.model_zoo.get_model` on a local ONNX file)
embeds it: RGB, (x - 127.5) / 127.5, a 512-d vector compared by cosine.

Without a local recognition model, a stand-in ONNX of the same signature (input `data`
N x 3 x 112 x 112 float, output N x 512) is built deterministically from a seed with the onnx
helper API and loaded through the very same insightface code path; its numbers mean nothing and
are labelled as such. Images in which no face is found are counted, never an error.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from charaforge.config import FaceConfig
from charaforge.core.files import find_local_file, sha256_bytes, sha256_file
from charaforge.core.logs import NativeNoiseFilter
from charaforge.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDING_DIM = 512
ALIGNED_SIZE = 112
STAND_IN_NAME = "charaforge-stand-in-arcface"
# Face Mesh landmark indices: eye corners (outer, inner) of the eye on the image's left and of
# the other eye, the nose tip, and the mouth corners.
_MESH_LEFT_EYE = (33, 133)
_MESH_RIGHT_EYE = (362, 263)
_MESH_NOSE = 1
_MESH_MOUTH = (61, 291)


@dataclass(frozen=True)
class Face:
    """One detected face: bounding box (x1, y1, x2, y2) in pixels, score, 5 x 2 landmarks."""

    bbox: tuple[float, float, float, float]
    score: float
    kps: np.ndarray

    @property
    def area(self) -> float:
        return max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1])


class FaceDetector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


class MediaPipeFaceDetector:
    """MediaPipe Face Mesh in static-image mode (its model ships in the 0.10.21 wheel)."""

    name = "mediapipe-face-mesh"

    def __init__(self, min_confidence: float, max_faces: int = 4) -> None:
        import mediapipe as mp

        # Its C++ graph writes start-up notes (XNNPACK, feedback tensors, NORM_RECT) to fd 2
        # from its own threads, as the pose graph does: filtered until the mesh is closed.
        self._quiet = NativeNoiseFilter().open()
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True,
            max_num_faces=max_faces,
            min_detection_confidence=min_confidence,
        )

    def close(self) -> None:
        self._mesh.close()
        self._quiet.close()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        found = self._mesh.process(np.ascontiguousarray(rgb)).multi_face_landmarks
        faces = []
        for landmarks in found or []:
            points = np.array([[p.x * width, p.y * height] for p in landmarks.landmark])
            kps = np.stack(
                [
                    points[list(_MESH_LEFT_EYE)].mean(axis=0),
                    points[list(_MESH_RIGHT_EYE)].mean(axis=0),
                    points[_MESH_NOSE],
                    points[_MESH_MOUTH[0]],
                    points[_MESH_MOUTH[1]],
                ]
            ).astype(np.float32)
            low, high = points.min(axis=0), points.max(axis=0)
            # Face Mesh reports no per-face score; a found mesh passed min_detection_confidence.
            faces.append(Face((low[0], low[1], high[0], high[1]), 1.0, kps))
        return faces


def one_thread_session() -> Any:
    """onnxruntime options with one thread per op: its default (one per core) makes float
    results depend on the machine, and so the bytes of scores.parquet."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


class InsightFaceDetector:
    """insightface's detector (SCRFD / RetinaFace) from a local ONNX file."""

    name = "insightface"

    def __init__(self, path: Path, min_confidence: float, input_size: int = 640) -> None:
        from insightface.model_zoo import get_model

        model = get_model(
            str(path), providers=["CPUExecutionProvider"], sess_options=one_thread_session()
        )
        if model is None or getattr(model, "taskname", "") != "detection":
            raise ConfigError(f"score.face.detector_path: {path} is not an insightface detector")
        model.prepare(ctx_id=-1, input_size=(input_size, input_size), det_thresh=min_confidence)
        self._model = model

    def close(self) -> None:
        pass

    def detect(self, rgb: np.ndarray) -> list[Face]:
        # insightface detectors take OpenCV's BGR order.
        bboxes, kpss = self._model.detect(np.ascontiguousarray(rgb[:, :, ::-1]), max_num=0)
        if kpss is None:
            return []
        return [
            Face(tuple(float(v) for v in box[:4]), float(box[4]), np.asarray(kps, np.float32))
            for box, kps in zip(bboxes, kpss, strict=True)
        ]


def align_face(rgb: np.ndarray, kps: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The face warped onto the ArcFace 5-point template (insightface `norm_crop`), RGB."""
    from insightface.utils import face_align

    with warnings.catch_warnings():
        # scikit-image deprecates SimilarityTransform.estimate, which norm_crop still calls.
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.norm_crop(rgb, landmark=np.asarray(kps, np.float32), image_size=size)


def build_stand_in_recognizer(seed: int) -> bytes:
    """ONNX bytes of a small random CNN with ArcFace's signature (N x 3 x 112 x 112 -> N x 512).

    Built with the onnx helper API from numpy draws of `seed`, so the bytes are the same on
    every machine. Node names avoid the `Sub`/`Mul` prefixes by which insightface recognises
    MXNet exports, so insightface applies the ArcFace normalisation (x - 127.5) / 127.5.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    initialisers = {
        "conv1_w": he((16, 3, 4, 4), 3 * 16),
        "conv1_b": np.zeros(16, np.float32),
        "conv2_w": he((32, 16, 4, 4), 16 * 16),
        "conv2_b": np.zeros(32, np.float32),
        "fc_w": he((32 * 7 * 7, EMBEDDING_DIM), 32 * 7 * 7),
        "fc_b": np.zeros(EMBEDDING_DIM, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["c1"], "conv1", strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node("Conv", ["r1", "conv2_w", "conv2_b"], ["c2"], "conv2", strides=[4, 4]),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc1"], "fc1"),
    ]
    graph = helper.make_graph(
        nodes,
        STAND_IN_NAME,
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", EMBEDDING_DIM])],
        [numpy_helper.from_array(value, name) for name, value in initialisers.items()],
    )
    model = helper.make_model(
        graph, producer_name="charaforge", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass
class FaceScorer:
    """Detector + aligner + recognition model, with a description of each for scorers.json."""

    detector: Any
    recognizer: Any
    description: dict[str, Any] = field(default_factory=dict)
    stand_in: bool = True

    def close(self) -> None:
        self.detector.close()

    def __enter__(self) -> FaceScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed_aligned(self, faces: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """L2-normalised float64 embeddings of aligned 112x112 RGB faces, one row per face."""
        rows = []
        for start in range(0, len(faces), batch_size):
            chunk = faces[start : start + batch_size]
            batch = [np.ascontiguousarray(face[:, :, ::-1]) for face in chunk]
            # get_feat expects OpenCV BGR, swaps to RGB and applies (x - 127.5) / 127.5.
            rows.append(np.asarray(self.recognizer.get_feat(batch), dtype=np.float64))
        if not rows:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float64)
        embeddings = np.concatenate(rows)
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)

    def largest_face(self, image: Image.Image | str | Path) -> np.ndarray | None:
        """The aligned crop of the largest face in the image, or None when there is none."""
        rgb = _rgb_array(image)
        faces = self.detector.detect(rgb)
        if not faces:
            return None
        face = max(faces, key=lambda item: (item.area, item.score))
        return align_face(rgb, face.kps)

    def embed_images(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 32
    ) -> np.ndarray:
        """Per image, the embedding of its largest face; a row of NaN where no face was found."""
        crops = [self.largest_face(image) for image in images]
        found = [index for index, crop in enumerate(crops) if crop is not None]
        result = np.full((len(images), EMBEDDING_DIM), np.nan, dtype=np.float64)
        if found:
            result[found] = self.embed_aligned([crops[index] for index in found], batch_size)
        return result


def _rgb_array(image: Image.Image | str | Path) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    with Image.open(image) as opened:
        return np.asarray(opened.convert("RGB"))


def _load_recognizer(config: FaceConfig) -> tuple[Any, dict[str, Any]]:
    from insightface.model_zoo import get_model

    if config.recognition == "stand_in":
        data = build_stand_in_recognizer(config.stand_in_seed)
        # insightface loads a model from a file; the session keeps the graph, the file can go.
        with tempfile.TemporaryDirectory(prefix="charaforge-arcface-") as folder:
            path = Path(folder) / f"{STAND_IN_NAME}.onnx"
            path.write_bytes(data)
            model = get_model(
                str(path), providers=["CPUExecutionProvider"], sess_options=one_thread_session()
            )
        description = {
            "model": STAND_IN_NAME,
            "weights": f"random, numpy default_rng({config.stand_in_seed})",
            "weights_sha256": sha256_bytes(data),
        }
    else:
        path = find_local_file(config.recognition_path or "", "score.face.recognition_path")
        model = get_model(
            str(path), providers=["CPUExecutionProvider"], sess_options=one_thread_session()
        )
        description = {"model": path.name, "weights_sha256": sha256_file(path)}
    if model is None or getattr(model, "taskname", "") != "recognition":
        raise ConfigError("score.face.recognition_path: not an insightface recognition model")
    if tuple(model.input_size) != (ALIGNED_SIZE, ALIGNED_SIZE):
        raise ConfigError(
            f"score.face.recognition_path: expects {ALIGNED_SIZE}x{ALIGNED_SIZE} input, the "
            f"model takes {model.input_size}"
        )
    return model, description


def _build_detector(config: FaceConfig) -> tuple[Any, str]:
    if config.detector_path:
        path = find_local_file(config.detector_path, "score.face.detector_path")
        return InsightFaceDetector(path, config.min_confidence), f"insightface ({path.name})"
    detector = MediaPipeFaceDetector(config.min_confidence, config.max_faces)
    return detector, "MediaPipe Face Mesh (mediapipe 0.10.21 wheel)"


def load_face_scorer(config: FaceConfig) -> FaceScorer:
    """Build the detector and the recognition model named by `config` (nothing downloaded)."""
    recognizer, description = _load_recognizer(config)
    detector, detector_name = _build_detector(config)
    description.update(
        {
            "library": "insightface",
            "detector": detector_name,
            "preprocessing": {
                "landmarks": "5 points: eyes, nose tip, mouth corners (largest face per image)",
                "alignment": "insightface face_align.norm_crop, similarity transform onto the "
                "ArcFace template, 112x112",
                "input": "RGB, (x - 127.5) / 127.5, NCHW",
                "embedding": f"{EMBEDDING_DIM}-d, L2-normalised",
            },
        }
    )
    return FaceScorer(
        detector=detector,
        recognizer=recognizer,
        description=description,
        stand_in=config.recognition == "stand_in",
    )


def reference_embedding(embeddings: np.ndarray) -> np.ndarray | None:
    """The normalised mean of the faces found in the references; None when none was found."""
    found = embeddings[~np.isnan(embeddings).any(axis=1)]
    if len(found) == 0:
        return None
    mean = found.mean(axis=0)
    return mean / np.linalg.norm(mean)


def identity_scores(embeddings: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Cosine of each embedding with the reference; NaN where there is no face or no reference."""
    if reference is None:
        return np.full(len(embeddings), np.nan)
    return embeddings @ reference
