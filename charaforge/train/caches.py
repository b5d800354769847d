"""Caches of VAE latents and text-encoder outputs, keyed by what determines them.

A latent entry is keyed by the image's content hash, the VAE's weights and the exact crop and
size it was encoded at; a text entry by the caption and the text encoders' weights. A changed
image, resolution, bucket or model therefore misses exactly the entries it must, and nothing
else is recomputed. Entries are safetensors files written atomically: a killed run leaves no
half-written entry. A latent entry holds the posterior's parameters (mean and log-variance),
not a sample, so training still draws a fresh latent sample every step.

Entries are read back memory-mapped (copy-on-write), not copied into process memory: a
20k-image dataset's latents stay in the page cache, read as batches need them, and the kernel can
drop them under pressure instead of the process holding them all. A computed entry is written
and then returned mapped too, so a first run does not keep what it encoded either.
"""

from __future__ import annotations

import hashlib
import json
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


# safetensors dtype names -> torch dtypes (the ones caches hold; others fail loudly).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_mapped(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of a copy-on-write memory map of the file.

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte
    offsets into the data that follows), then the raw data. The file is mapped by
    `torch.from_file` (MAP_PRIVATE: writes stay private), which closes its descriptor once
    mapped; numpy's memmap keeps one open per map, and 20k latents plus 20k text entries would
    pass the usual limit of open files.
    """
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    data_start = 8 + header_size
    size = Path(path).stat().st_size
    mapped = (
        torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        if size > data_start
        else None
    )
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if end == start or mapped is None:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = mapped[data_start + start : data_start + end]
        if (data_start + start) % dtype.itemsize:
            raw = raw.clone()  # a view needs aligned elements; save_file aligns, others may not
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors


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
        from safetensors.torch import save_file

        path = self.folder / key[:2] / f"{key}.safetensors"
        if path.is_file():
            self.hits += 1
            return load_mapped(path)
        self.misses += 1
        tensors = {name: value.detach().cpu().contiguous() for name, value in compute().items()}
        with atomic_path(path) as temp:
            save_file(tensors, str(temp))
        return load_mapped(path)

    def report(self) -> None:
        if self.folder is not None:
            log.info("%s cache: %d hits, %d computed", self.kind, self.hits, self.misses)
