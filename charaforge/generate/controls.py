"""ControlNet preprocessors: the map each control type reads, made from an ordinary photo.

One function per type, each returning an RGB image of the photo's size:

- openpose: MediaPipe Pose (the model in the pinned wheel) drawn as an OpenPose skeleton;
- canny: OpenCV's Canny edges, white on black;
- lineart: dark lines found by OpenCV's adaptive threshold, as white lines on black;
- softedge: the Sobel gradient magnitude of a blurred photo, scaled to 0-255 (HED-like);
- scribble: Canny edges thickened into strokes (dilation), as a user's scribble;
- depth: a transformers depth-estimation model from a local folder, or a stand-in DPT (the real
  class with seeded random weights: it runs the same code path and means nothing);
- normal: surface normals from that depth map (Sobel gradients, the ControlNet normal colours);
- segmentation: person/background from MediaPipe selfie segmentation (shipped in the wheel),
  the person in the ADE20K palette's person colour on black.

`ControlPreprocessor` keeps the models it loads, so a batch of photos loads each once.
`save_control_maps` writes what conditioned an image beside it, so a user can see it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from charaforge.config import PoseConfig
from charaforge.core.files import derive_seed, write_png
from charaforge.generate.request import CONTROL_TYPES, ControlUnit
from charaforge.models.base import resolve_pretrained
from charaforge.prepare.pose import PoseDetector, draw_skeleton

log = logging.getLogger(__name__)

CANNY_LOW, CANNY_HIGH = 100, 200
# ADE20K's colour for "person" (class 12), which ControlNet-seg was trained with.
ADE20K_PERSON = (150, 5, 61)
# A normal map's z before normalising: the larger, the flatter a given depth slope looks.
NORMAL_Z = 1.0
SEGMENTATION_THRESHOLD = 0.5
DEFAULT_POSE = PoseConfig(backend="mediapipe", model_complexity=1, min_detection_confidence=0.3)


def _gray(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("L"), dtype=np.uint8))


def _rgb(channel: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(channel.astype(np.uint8))).convert("RGB")


def canny_map(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """OpenCV Canny edges (white on black, three channels), as ControlNet-canny expects."""
    import cv2

    return _rgb(cv2.Canny(_gray(image), low, high))


def lineart_map(image: Image.Image, block_size: int = 9, offset: int = 4) -> Image.Image:
    """Line art: pixels darker than their neighbourhood mean by `offset`, white on black."""
    import cv2

    gray = cv2.GaussianBlur(_gray(image), (3, 3), 0)
    lines = cv2.adaptiveThreshold(
        gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block_size, offset
    )
    return _rgb(lines)


def softedge_map(image: Image.Image, blur_sigma: float = 1.5) -> Image.Image:
    """Soft edges: the gradient magnitude of the blurred photo, scaled so its maximum is 255."""
    import cv2

    gray = cv2.GaussianBlur(_gray(image).astype(np.float32), (0, 0), blur_sigma)
    magnitude = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    peak = float(magnitude.max())
    scaled = magnitude / peak * 255.0 if peak > 0 else magnitude
    return _rgb(np.round(scaled))


def scribble_map(image: Image.Image, stroke: int = 3) -> Image.Image:
    """A scribble: Canny edges dilated into `stroke`-pixel strokes, white on black."""
    import cv2

    edges = cv2.Canny(_gray(image), CANNY_LOW, CANNY_HIGH)
    kernel = np.ones((stroke, stroke), np.uint8)
    return _rgb(cv2.dilate(edges, kernel))


def normal_from_depth(depth: np.ndarray, z: float = NORMAL_Z) -> Image.Image:
    """A normal map from a depth map (larger = nearer, as depth-estimation models output).

    n = normalise(-dD/dx, dD/dy, z) with the slopes per pixel (3x3 Sobel / 8), then
    RGB = (n + 1) / 2 * 255: a flat surface facing the camera is (128, 128, 255).
    """
    import cv2

    depth = np.asarray(depth, dtype=np.float32)
    # The 3x3 Sobel of a ramp of slope k is 8k: divided by 8 it is the slope itself.
    dx = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8.0
    dy = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8.0
    normal = np.stack([-dx, dy, np.full_like(depth, z)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    return Image.fromarray(np.round((normal + 1.0) * 127.5).clip(0, 255).astype(np.uint8))


def person_mask(image: Image.Image, threshold: float = SEGMENTATION_THRESHOLD) -> Image.Image:
    """White where MediaPipe selfie segmentation sees a person (the general model, offline)."""
    return Image.fromarray(((person_probability(image) >= threshold) * 255).astype(np.uint8))


def person_probability(image: Image.Image) -> np.ndarray:
    """MediaPipe's per-pixel person probability (float32, the photo's height x width)."""
    import mediapipe as mp

    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as segmenter:
        return np.asarray(segmenter.process(rgb).segmentation_mask, dtype=np.float32)


def segmentation_map(image: Image.Image) -> Image.Image:
    """The person in ADE20K's person colour on black (ControlNet-seg's palette)."""
    mask = np.asarray(person_mask(image)) > 0
    canvas = np.zeros((*mask.shape, 3), np.uint8)
    canvas[mask] = ADE20K_PERSON
    return Image.fromarray(canvas)


def build_stand_in_depth_estimator(seed: int = 0) -> tuple[Any, Any]:
    """A tiny DPT depth model (the real transformers classes, seeded random weights)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("stand_in", "depth", seed))
        model = DPTForDepthEstimation(config).eval()
    processor = DPTImageProcessor(
        size={"height": 64, "width": 64}, keep_aspect_ratio=False, ensure_multiple_of=16
    )
    return model, processor


class ControlPreprocessor:
    """Makes control maps from photos; depth and pose models are loaded once, on first use.

    `depth_model`: a local depth-estimation folder (DPT, Depth Anything...); without one a
    stand-in DPT is used and a warning says that its depth means nothing.
    """

    def __init__(self, depth_model: str | None = None, pose: PoseConfig = DEFAULT_POSE) -> None:
        self.depth_model = depth_model
        self.pose = pose
        self._depth: Any = None

    @property
    def depth_is_stand_in(self) -> bool:
        return not self.depth_model

    def __call__(self, control_type: str, image: Image.Image) -> Image.Image:
        """The control map of `control_type` for a photo (RGB, the photo's size)."""
        image = image.convert("RGB")
        if control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type {control_type!r}: one of {CONTROL_TYPES}")
        makers = {
            "canny": canny_map,
            "lineart": lineart_map,
            "softedge": softedge_map,
            "scribble": scribble_map,
            "segmentation": segmentation_map,
            "openpose": self.openpose,
            "depth": lambda photo: Image.fromarray(self._depth_u8(photo)).convert("RGB"),
            "normal": lambda photo: normal_from_depth(self.depth(photo)),
        }
        return makers[control_type](image)

    def openpose(self, image: Image.Image) -> Image.Image:
        with PoseDetector(self.pose) as detector:
            return draw_skeleton(detector.detect(image), self.pose.min_visibility)

    def depth(self, image: Image.Image) -> np.ndarray:
        """Relative depth (float32, larger = nearer) at the photo's size."""
        import torch
        from transformers import pipeline

        if self._depth is None:
            if self.depth_model:
                self._depth = pipeline(
                    "depth-estimation", model=str(resolve_pretrained(self.depth_model))
                )
            else:
                log.warning("depth: no depth_model given, using the stand-in (random weights)")
                model, processor = build_stand_in_depth_estimator()
                self._depth = pipeline("depth-estimation", model=model, image_processor=processor)
        with torch.no_grad():
            result = self._depth(image.convert("RGB"))
        depth = result["predicted_depth"]
        depth = depth.squeeze().float()[None, None]
        resized = torch.nn.functional.interpolate(
            depth, size=image.size[::-1], mode="bicubic", align_corners=False
        )
        return resized[0, 0].numpy().astype(np.float32)

    def _depth_u8(self, image: Image.Image) -> np.ndarray:
        depth = self.depth(image)
        low, high = float(depth.min()), float(depth.max())
        scaled = (depth - low) / (high - low) * 255.0 if high > low else depth * 0.0
        return np.round(scaled).astype(np.uint8)


def control_map_path(image_path: str | Path, index: int, control_type: str) -> Path:
    """Where the map that conditioned an image is saved: `<stem>.control<i>-<type>.png`."""
    image_path = Path(image_path)
    return image_path.with_name(f"{image_path.stem}.control{index}-{control_type}.png")


def save_control_maps(image_path: str | Path, units: Sequence[ControlUnit]) -> list[Path]:
    """Write each unit's map beside the image it conditioned (atomically); return the paths."""
    written = []
    for index, unit in enumerate(units):
        path = control_map_path(image_path, index, unit.control_type)
        write_png(path, unit.image.convert("RGB"))
        written.append(path)
    return written
