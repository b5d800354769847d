"""LoRA files as the engine loads them: adapter names, A1111's short hash, file lookup."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from charaforge.core.layout import LORA_WEIGHTS


def adapter_name(text: str) -> str:
    """A peft-safe adapter name (peft keeps adapters in module dicts: no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA hash: SHA-256 of the safetensors data after its header, first 12 digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class LoadedLora:
    name: str
    file: Path
    sha256: str
    short_hash: str
    trigger_words: tuple[str, ...] = ()


def lora_file(path: str | Path) -> Path:
    """A LoRA file given as a .safetensors file or a checkpoint folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    return path
