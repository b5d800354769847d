"""LoRA files as the engine loads them: adapter names, A1111's short hash, file lookup."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from charaforge.core.files import sha256_file
from charaforge.core.layout import LORA_WEIGHTS


def adapter_name(text: str) -> str:
    """A peft-safe adapter name (peft keeps adapters in module dicts: no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA hash: SHA-256 of the safetensors data after its header, first 12 digits.

    A1111's Lora extension hashes `.safetensors` files with kohya's "addnet" hash (header
    skipped, so metadata edits keep the hash) and shows the first 12 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class LoadedLora:
    """A loaded LoRA: the engine's adapter `name`, the `file` it was loaded from (its `sha256`),
    and how A1111 knows the same LoRA: `a1111_name` (the stem A1111 lists) and `short_hash`
    (A1111's hash of that file), which the PNG `parameters` carry."""

    name: str
    file: Path
    sha256: str
    short_hash: str
    trigger_words: tuple[str, ...] = ()
    a1111_name: str = ""


def a1111_lora_file(file: str | Path) -> Path:
    """The file A1111 and ComfyUI users load for this LoRA.

    A checkpoint folder holds diffusers' `pytorch_lora_weights.safetensors` and the kohya file
    beside it; A1111 reads the kohya one, so a PNG rendered from the diffusers file must name
    (and hash) its kohya sibling. Any other file is its own.
    """
    file = Path(file)
    if file.name == LORA_WEIGHTS:
        siblings = sorted(
            path for path in file.parent.glob("*.safetensors") if path.name != LORA_WEIGHTS
        )
        if len(siblings) == 1:
            return siblings[0]
    return file


def describe_lora(name: str, file: str | Path, trigger_words: tuple[str, ...] = ()) -> LoadedLora:
    """The record of a LoRA file loaded as adapter `name`, with its A1111 name and hash."""
    file = Path(file)
    a1111_file = a1111_lora_file(file)
    return LoadedLora(
        name=name,
        file=file,
        sha256=sha256_file(file),
        short_hash=lora_short_hash(a1111_file),
        trigger_words=tuple(trigger_words),
        a1111_name=a1111_file.stem,
    )


def lora_file(path: str | Path) -> Path:
    """A LoRA file given as a .safetensors file or a checkpoint folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    return path
