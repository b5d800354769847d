"""Tagging of the kept images behind a small `Tagger` protocol.

A tagger turns one image (its pixels and/or its sidecar caption) into tags with scores. Backends:

- `sidecar`: the kohya-style `.txt` caption that came with the image (every tag scores 1.0).
- `clip`: CLIP zero-shot over a tag vocabulary (`charaforge.scoring.load_clip`: the seeded stand-in
  or a local open_clip checkpoint). A tag's score is the two-way softmax, at the model's own logit
  scale, of the image's similarity to "a picture of <tag>" against a neutral "a picture": the
  probability that naming the tag describes the image better than saying nothing. Independent per
  tag (multi-label), unlike a softmax over the whole vocabulary.
- `wd14`: a WD14-style ONNX tagger from local files (`charaforge.wd14`).

Every backend's tags then go through the same post-processing (replacements, deny list, allow
list), and `tag_folder` writes a tag frequency table beside the tags.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
from PIL import Image

from charaforge.config import TaggerConfig
from charaforge.dedupe import kept_rows
from charaforge.io import write_csv, write_parquet

if TYPE_CHECKING:
    from charaforge.scoring import ClipEmbedder

log = logging.getLogger(__name__)

TAG_COLUMNS = ["image_id", "tags", "scores", "tagger"]
FREQUENCY_COLUMNS = ["tag", "count", "fraction"]


@dataclass(frozen=True)
class TagRequest:
    """Everything a tagger may look at for one image."""

    image_id: str
    image_path: str  # the normalised RGB PNG written by ingest
    sidecar_text: str | None  # the caption that came with the source file, if any


@dataclass(frozen=True)
class TagResult:
    tags: list[str]
    scores: list[float]


class Tagger(Protocol):
    name: str

    def tag(self, request: TagRequest) -> TagResult: ...


def parse_sidecar(text: str | None) -> list[str]:
    """Comma-separated tags: stripped, lower-cased, empty ones dropped, first occurrence kept.

    Newlines separate tags too: some captions put one tag per line.
    """
    if not text:
        return []
    seen: dict[str, None] = {}
    for raw in text.replace("\n", ",").split(","):
        tag = raw.strip().lower()
        if tag:
            seen.setdefault(tag, None)
    return list(seen)


class SidecarTagger:
    """Tags from the sidecar caption; every tag is certain (score 1.0). No sidecar: no tags."""

    name = "sidecar"

    def tag(self, request: TagRequest) -> TagResult:
        tags = parse_sidecar(request.sidecar_text)
        return TagResult(tags=tags, scores=[1.0] * len(tags))


def _open_rgb(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


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
        from charaforge.scoring import load_clip

        clip = config.clip
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
        return self.select(self.score_images([_open_rgb(image)])[0])

    def tag(self, request: TagRequest) -> TagResult:
        return self.tag_image(request.image_path)

    def tag_many(self, requests: Sequence[TagRequest]) -> list[TagResult]:
        """Batched: one embedding pass over all the images."""
        probabilities = self.score_images([request.image_path for request in requests])
        return [self.select(row) for row in probabilities]


def build_tagger(config: TaggerConfig) -> Tagger:
    """The tagger `config.backend` names (model backends load their weights here)."""
    if config.backend == "sidecar":
        return SidecarTagger()
    if config.backend == "clip":
        return ClipZeroShotTagger.from_config(config)
    if config.backend == "wd14":
        from charaforge.wd14 import Wd14Tagger

        return Wd14Tagger.from_config(config)
    raise ValueError(f"tagger.backend {config.backend!r} is not implemented")


def postprocess(result: TagResult, config: TaggerConfig) -> TagResult:
    """Replacements, then the deny list, then the allow list; first occurrence of a tag wins."""
    replace = {key.strip().lower(): value.strip().lower() for key, value in config.replace.items()}
    deny = {tag.strip().lower() for tag in config.deny}
    allow = {tag.strip().lower() for tag in config.allow}
    kept: dict[str, float] = {}
    for tag, score in zip(result.tags, result.scores, strict=True):
        tag = replace.get(tag, tag)
        if not tag or tag in deny or (allow and tag not in allow) or tag in kept:
            continue
        kept[tag] = score
    return TagResult(tags=list(kept), scores=list(kept.values()))


def tag_images(
    rows: pd.DataFrame, tagger: Tagger, config: TaggerConfig | None = None
) -> pd.DataFrame:
    """The tags table for manifest rows (columns image_id, tags, scores, tagger).

    With `config`, its replacements and allow/deny lists are applied to every image's tags.
    """
    requests = [
        TagRequest(
            row.image_id,
            row.image_path,
            row.sidecar_text if isinstance(row.sidecar_text, str) else None,
        )
        for row in rows.itertuples()
    ]
    many = getattr(tagger, "tag_many", None)
    results = many(requests) if many else [tagger.tag(request) for request in requests]
    records = []
    for request, result in zip(requests, results, strict=True):
        if config is not None:
            result = postprocess(result, config)
        records.append(
            {
                "image_id": request.image_id,
                "tags": result.tags,
                "scores": [float(score) for score in result.scores],
                "tagger": tagger.name,
            }
        )
    return pd.DataFrame(records, columns=TAG_COLUMNS)


def tag_folder(
    ingest_dir: str | Path, dedupe_dir: str | Path, out_dir: str | Path, config: TaggerConfig
) -> pd.DataFrame:
    """Tag the kept images; write `out_dir/tags.parquet` and return the table."""
    manifest = pd.read_parquet(Path(ingest_dir) / "manifest.parquet")
    dedupe_table = pd.read_parquet(Path(dedupe_dir) / "dedupe.parquet")
    tagger = build_tagger(config)
    table = tag_images(kept_rows(manifest, dedupe_table), tagger, config)
    write_parquet(Path(out_dir) / "tags.parquet", table)
    write_csv(Path(out_dir) / "tag_frequency.csv", tag_frequency(table["tags"]))
    if getattr(tagger, "stand_in", False):
        log.warning("tag: %s uses a stand-in model: its tags mean nothing", tagger.name)
    untagged = int((table["tags"].map(len) == 0).sum())
    log.info("tag: %d images tagged with %s, %d without tags", len(table), config.backend, untagged)
    return table


def tag_frequency(tag_lists: Sequence[Sequence[str]]) -> pd.DataFrame:
    """How many images carry each tag: columns tag, count, fraction; most frequent first."""
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for tag in dict.fromkeys(str(t) for t in tags):
            counts[tag] = counts.get(tag, 0) + 1
    images = len(tag_lists)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return pd.DataFrame(
        [(tag, count, round(count / images, 6)) for tag, count in ranked], columns=FREQUENCY_COLUMNS
    ).astype({"count": "int64"})
