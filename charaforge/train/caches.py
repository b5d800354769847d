"""Caches of VAE latents and text-encoder outputs, keyed by what determines them.

A latent entry is keyed by the image's content hash, the VAE's weights and the exact crop and
size it was encoded at; a text entry by the caption and the text encoders' weights. A changed
image, resolution, bucket or model therefore misses exactly the entries it must, and nothing
else is recomputed. Entries are safetensors files written atomically: a killed run leaves no
half-written entry. A latent entry holds the posterior's parameters (mean and log-variance),
not a sample, so training still draws a fresh latent sample every step.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from charaforge.core.files import atomic_path, sha256_file

log = logging.getLogger(__name__)

_FINGERPRINTS: dict[Path, str] = {}


def component_fingerprint(folder: str | Path) -> str:
    """A content hash of a model component folder (config and weights), memoised per process."""
    folder = Path(folder).resolve()
    if folder not in _FINGERPRINTS:
        if not folder.is_dir():
            raise FileNotFoundError(f"model component folder not found: {folder}")
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(sha256_file(path).encode())
        _FINGERPRINTS[folder] = digest.hexdigest()[:16]
    return _FINGERPRINTS[folder]


def cache_key(*parts: object) -> str:
    text = "\x1f".join(str(part) for part in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TensorCache:
    """A folder of safetensors entries, one per key; `None` folder means no caching at all."""

    def __init__(self, folder: str | Path | None, kind: str) -> None:
        self.folder = Path(folder) / kind if folder is not None else None
        self.kind = kind
        self.hits = 0
        self.misses = 0

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        if self.folder is None:
            self.misses += 1
            return compute()
        from safetensors.torch import load_file, save_file

        path = self.folder / key[:2] / f"{key}.safetensors"
        if path.is_file():
            self.hits += 1
            return load_file(str(path))
        self.misses += 1
        tensors = {name: value.detach().cpu().contiguous() for name, value in compute().items()}
        with atomic_path(path) as temp:
            save_file(tensors, str(temp))
        return tensors

    def report(self) -> None:
        if self.folder is not None:
            log.info("%s cache: %d hits, %d computed", self.kind, self.hits, self.misses)
