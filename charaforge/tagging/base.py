"""Tagging of the kept images behind a small `Tagger` protocol.

A tagger turns one image (its pixels and/or its sidecar caption) into tags with scores. Backends:

- `sidecar`: the kohya-style `.txt` caption that came with the image (every tag scores 1.0).
- `clip`: CLIP zero-shot over a tag vocabulary (`charaforge.models.clip.load_clip`: the stand-in
  or a local open_clip checkpoint). A tag's score is the two-way softmax, at the model's own logit
  scale, of the image's similarity to "a picture of <tag>" against a neutral "a picture": the
  probability that naming the tag describes the image better than saying nothing. Independent per
  tag (multi-label), unlike a softmax over the whole vocabulary.
- `wd14`: a WD14-style ONNX tagger from local files (`charaforge.tagging.wd14`).

Every backend's tags then go through the same post-processing (replacements, deny list, allow
list), and `tag_folder` writes a tag frequency table beside the tags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from charaforge.config import TaggerConfig

log = logging.getLogger(__name__)

TAG_COLUMNS = ["image_id", "tags", "scores", "tagger"]


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
