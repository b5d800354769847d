"""The `clip` tagger: CLIP zero-shot over a tag vocabulary (see `charaforge.tagging.base`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from charaforge.config import TaggerConfig
from charaforge.core.images import open_rgb
from charaforge.models.base import set_cpu_threads
from charaforge.models.clip import ClipEmbedder, load_clip
from charaforge.tagging.base import (
    TagRequest,
    TagResult,
)

log = logging.getLogger(__name__)


class ClipZeroShotTagger:
    """CLIP zero-shot multi-label tagger over a fixed vocabulary.

    The text side (one prompt per tag and the baseline prompt) is embedded once at construction;
    `score_images` then costs one image embedding per image. Results computed with the stand-in
    CLIP carry "(stand-in)" in the tagger name, which is what tables and reports show.
    """

    def __init__(
        self,
        embedder: ClipEmbedder,
        vocabulary: Sequence[str],
        threshold: float = 0.5,
        prompt_template: str = "a picture of {tag}",
        baseline_prompt: str = "a picture",
        max_tags: int = 0,
        batch_size: int = 16,
    ) -> None:
        vocabulary = list(dict.fromkeys(tag.strip().lower() for tag in vocabulary if tag.strip()))
        if not vocabulary:
            raise ValueError("the CLIP zero-shot tagger needs at least one vocabulary tag")
        self.embedder = embedder
        self.vocabulary = vocabulary
        self.threshold = threshold
        self.max_tags = max_tags
        self.batch_size = batch_size
        texts = [prompt_template.format(tag=tag) for tag in vocabulary] + [baseline_prompt]
        embedded = embedder.embed_texts(texts, batch_size)
        self._tag_embeddings, self._baseline = embedded[:-1], embedded[-1]
        # The model's own temperature: pretrained CLIP learns ~100, the stand-in keeps 1/0.07.
        self.logit_scale = float(embedder.model.logit_scale.exp().item())
        model = embedder.description.get("model", "clip")
        self.name = f"clip-zero-shot:{model}" + (" (stand-in)" if embedder.stand_in else "")

    @classmethod
    def from_config(cls, config: TaggerConfig) -> ClipZeroShotTagger:
        clip = config.clip
        set_cpu_threads(clip.cpu_threads)  # before any embedding: the bytes do not vary
        return cls(
            load_clip(clip.model),
            clip.vocabulary,
            threshold=clip.threshold,
            prompt_template=clip.prompt_template,
            baseline_prompt=clip.baseline_prompt,
            max_tags=clip.max_tags,
            batch_size=clip.batch_size,
        )

    @property
    def stand_in(self) -> bool:
        return bool(self.embedder.stand_in)

    def score_embeddings(self, image_embeddings: np.ndarray) -> np.ndarray:
        """Tag probabilities (n_images x n_tags) from L2-normalised image embeddings."""
        tag_cos = image_embeddings @ self._tag_embeddings.T
        base_cos = image_embeddings @ self._baseline
        # softmax([s_tag, s_base])[0] == sigmoid(s_tag - s_base), at the model's logit scale.
        return 1.0 / (1.0 + np.exp(-self.logit_scale * (tag_cos - base_cos[:, None])))

    def score_images(self, images: Sequence[Image.Image | str | Path]) -> np.ndarray:
        """Tag probabilities (n_images x n_tags, float64, columns in vocabulary order)."""
        return self.score_embeddings(self.embedder.embed_images(list(images), self.batch_size))

    def select(self, probabilities: np.ndarray) -> TagResult:
        """Tags scoring at least the threshold, best first, at most max_tags."""
        order = np.argsort(-probabilities, kind="stable")
        chosen = [int(i) for i in order if probabilities[i] >= self.threshold]
        if self.max_tags:
            chosen = chosen[: self.max_tags]
        return TagResult(
            tags=[self.vocabulary[i] for i in chosen],
            scores=[round(float(probabilities[i]), 6) for i in chosen],
        )

    def tag_image(self, image: Image.Image | str | Path) -> TagResult:
        return self.select(self.score_images([open_rgb(image)])[0])

    def tag(self, request: TagRequest) -> TagResult:
        return self.tag_image(request.image_path)

    def tag_many(self, requests: Sequence[TagRequest]) -> list[TagResult]:
        """Batched: one embedding pass over all the images."""
        probabilities = self.score_images([request.image_path for request in requests])
        return [self.select(row) for row in probabilities]
