"""The `sidecar` tagger: the kohya-style `.txt` caption that came with the image."""

from __future__ import annotations

import logging

from charaforge.tagging.base import (
    TagRequest,
    TagResult,
)

log = logging.getLogger(__name__)


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
