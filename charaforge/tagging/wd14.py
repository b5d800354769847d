"""WD14-style ONNX tagger (SmilingWolf's wd-v1-4 / wd-*-tagger-v3 family) from local files.

A model folder holds `model.onnx` and `selected_tags.csv` (columns `tag_id, name, category,
count`; category 9 = rating, 0 = general, 4 = character). The reference preprocessing, which the
tagger was trained with and so must be matched exactly:

1. composite any transparency on white, RGB;
2. pad to a square with white, the image centred (the left/top pad is the smaller half);
3. resize to the model's input side (read from the ONNX input shape, 448 for the released
   models) with bicubic interpolation, only when the side differs;
4. float32 pixel values 0..255, channels in BGR order, layout NHWC, no normalisation.

The model outputs one sigmoid probability per row of `selected_tags.csv`. General tags at or
above the general threshold (0.35) and character tags at or above the character threshold (0.85)
are kept, best first; the rating is the best of the rating rows. Tag names have underscores
replaced by spaces, except kaomoji such as `^_^`, whose underscore is part of the face.
Nothing is downloaded: a missing file fails with the places it looked.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from charaforge.config import TaggerConfig
from charaforge.core.files import find_local_file
from charaforge.core.images import open_image
from charaforge.tagging.base import TagRequest, TagResult

log = logging.getLogger(__name__)

RATING, GENERAL, CHARACTER = 9, 0, 4
# Tags whose underscore is part of the face (the reference tagger leaves these alone).
KAOMOJI = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
        ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Wd14Labels:
    names: list[str]
    categories: np.ndarray  # int, one per model output

    @property
    def general(self) -> np.ndarray:
        return np.flatnonzero(self.categories == GENERAL)

    @property
    def character(self) -> np.ndarray:
        return np.flatnonzero(self.categories == CHARACTER)

    @property
    def rating(self) -> np.ndarray:
        return np.flatnonzero(self.categories == RATING)


@dataclass
class Wd14Prediction:
    general: dict[str, float] = field(default_factory=dict)  # above threshold, best first
    character: dict[str, float] = field(default_factory=dict)  # above threshold, best first
    rating: dict[str, float] = field(default_factory=dict)  # every rating row

    @property
    def best_rating(self) -> str | None:
        return max(self.rating, key=self.rating.__getitem__) if self.rating else None


WD14_HINT = "put the WD14 model.onnx and selected_tags.csv there"


def tag_name(raw: str) -> str:
    return raw if raw in KAOMOJI else raw.replace("_", " ")


def read_labels(path: str | Path) -> Wd14Labels:
    """`selected_tags.csv`: the `name` and `category` columns, one row per model output."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"name", "category"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no tags")
    try:
        categories = np.array([int(row["category"]) for row in rows], dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"{path}: category must be an integer ({error})") from None
    return Wd14Labels([tag_name(row["name"]) for row in rows], categories)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """One image as the model's input row: (size, size, 3) float32, BGR, 0..255, white padding."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(pixels[:, :, ::-1])


class Wd14Tagger:
    """onnxruntime session over a WD14-style model; implements the `Tagger` protocol."""

    name = "wd14"
    stand_in = False

    def __init__(
        self,
        model_path: str | Path,
        tags_path: str | Path,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        include_rating: bool = False,
        character_first: bool = True,
        batch_size: int = 8,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread per session op keeps results identical run to run and shares the cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.labels = read_labels(tags_path)
        model_input = self.session.get_inputs()[0]
        shape = model_input.shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise ValueError(f"{model_path}: expected an NHWC input (N, S, S, 3), got {shape}")
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.size = int(shape[1])
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.labels.names):
            raise ValueError(
                f"{model_path} has {outputs} outputs but {tags_path} lists "
                f"{len(self.labels.names)} tags"
            )
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.include_rating = include_rating
        self.character_first = character_first
        self.batch_size = batch_size
        self.name = f"wd14:{Path(model_path).parent.name or Path(model_path).name}"

    @classmethod
    def from_config(cls, config: TaggerConfig) -> Wd14Tagger:
        model_path = find_local_file(
            config.wd14.model_path or "", "tagger.wd14.model_path", WD14_HINT
        )
        tags_path = (
            find_local_file(config.wd14.tags_path, "tagger.wd14.tags_path", WD14_HINT)
            if config.wd14.tags_path
            else find_local_file(
                str(model_path.parent / "selected_tags.csv"), "tagger.wd14.tags_path", WD14_HINT
            )
        )
        return cls(
            model_path,
            tags_path,
            general_threshold=config.general_threshold,
            character_threshold=config.character_threshold,
            include_rating=config.wd14.include_rating,
            character_first=config.wd14.character_first,
        )

    def probabilities(self, images: Sequence[Image.Image | str | Path]) -> np.ndarray:
        """Model outputs (n_images x n_tags), in `selected_tags.csv` order."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack(
                [
                    preprocess(open_image(item), self.size)
                    for item in images[start : start + self.batch_size]
                ]
            )
            rows.append(self.session.run([self.output_name], {self.input_name: batch})[0])
        if not rows:
            return np.zeros((0, len(self.labels.names)), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32)

    def predict(self, probabilities: np.ndarray) -> Wd14Prediction:
        """Thresholded tags of one image from its output row."""
        names = self.labels.names

        def above(indices: np.ndarray, threshold: float) -> dict[str, float]:
            # Compared in the model's own precision, so a float32 output equal to the configured
            # threshold (0.35 is not exact in binary) counts as reaching it, as kohya's does.
            limit = np.asarray(threshold, dtype=probabilities.dtype)
            chosen = [int(i) for i in indices if probabilities[i] >= limit]
            chosen.sort(key=lambda i: (-float(probabilities[i]), i))
            return {names[i]: round(float(probabilities[i]), 6) for i in chosen}

        return Wd14Prediction(
            general=above(self.labels.general, self.general_threshold),
            character=above(self.labels.character, self.character_threshold),
            rating={names[i]: round(float(probabilities[i]), 6) for i in self.labels.rating},
        )

    def result(self, prediction: Wd14Prediction) -> TagResult:
        parts = (
            [prediction.character, prediction.general]
            if self.character_first
            else [prediction.general, prediction.character]
        )
        tags: dict[str, float] = {}
        for part in parts:
            for tag, score in part.items():
                tags.setdefault(tag, score)
        if self.include_rating and prediction.best_rating is not None:
            rating = prediction.best_rating
            tags.setdefault(f"rating:{rating}", prediction.rating[rating])
        return TagResult(tags=list(tags), scores=list(tags.values()))

    def tag_image(self, image: Image.Image | str | Path) -> TagResult:
        return self.result(self.predict(self.probabilities([image])[0]))

    def tag(self, request: TagRequest) -> TagResult:
        return self.tag_image(request.image_path)

    def tag_many(self, requests: Sequence[TagRequest]) -> list[TagResult]:
        probabilities = self.probabilities([request.image_path for request in requests])
        return [self.result(self.predict(row)) for row in probabilities]


def _open(item: Image.Image | str | Path) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    with Image.open(item) as image:
        image.load()
        return image.copy()
