"""Atomic, deterministic writers shared by every stage.

Outputs are written under a temporary name next to their destination and renamed into place, so
an interrupted stage never leaves a half-written output. Writers avoid timestamps and other
run-dependent bytes so that the same inputs give the same bytes (DVC hashes prove it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charaforge.errors import DISK_ERRNOS, WRITTEN_BYTES, ConfigError

if TYPE_CHECKING:  # annotations only: importing pandas costs ~0.5 s, e.g. on `charaforge --help`
    import pandas as pd
    from PIL import Image


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from the global seed and any identifying parts (stable across runs)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def temp_folder_prefix(destination: str | Path) -> str:
    """The name start of `atomic_path`'s temporary folder for `destination` (mkdtemp adds 8
    random characters)."""
    return f".{Path(destination).name}."


def stale_temp_folders(destination: str | Path) -> list[Path]:
    """`atomic_path` folders beside `destination` that a killed writer left (SIGKILL skips the
    clean-up); only the caller knows that no live writer still uses them."""
    destination = Path(destination)
    if not destination.parent.is_dir():
        return []
    pattern = re.compile(re.escape(temp_folder_prefix(destination)) + r"[a-z0-9_]{8}")
    return sorted(
        child
        for child in destination.parent.iterdir()
        if pattern.fullmatch(child.name) and child.is_dir() and not child.is_symlink()
    )


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; move it into place only on success.

    Works for files and directories: whatever the caller creates at the yielded path replaces the
    destination atomically (a directory is swapped in with one rename after the old one is moved
    aside).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp_root = Path(
        tempfile.mkdtemp(prefix=temp_folder_prefix(destination), dir=destination.parent)
    )
    temp_path = temp_root / destination.name
    try:
        try:
            yield temp_path
        except OSError as error:
            # A write() error names no file, and a nested one names a temporary path: a full
            # disk must say where it was writing, by the name the user will look for.
            named = str(error.filename) if error.filename is not None else str(temp_path)
            if error.errno in DISK_ERRNOS:  # measured before the clean-up below deletes it
                written = getattr(error, WRITTEN_BYTES, 0) + _tree_bytes(temp_root)
                setattr(error, WRITTEN_BYTES, written)
            if error.errno is not None and named.startswith(str(temp_path)):
                real = str(destination) + named[len(str(temp_path)) :]
                renamed = OSError(error.errno, error.strerror, real)
                if hasattr(error, WRITTEN_BYTES):
                    setattr(renamed, WRITTEN_BYTES, getattr(error, WRITTEN_BYTES))
                raise renamed from error
            raise
        if not temp_path.exists():
            raise FileNotFoundError(f"nothing was written for {destination}")
        if destination.is_dir() and not destination.is_symlink():
            trash = temp_root / ".old"
            os.replace(destination, trash)
        os.replace(temp_path, destination)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root` (links not followed)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_png(path: str | Path, image: Image.Image, pnginfo: Any = None) -> None:
    """PNG without time chunks: PIL writes none unless asked, so the bytes depend on pixels only."""
    with atomic_path(path) as temp:
        image.save(temp, format="PNG", pnginfo=pnginfo, optimize=False, compress_level=6)


def write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temp:
        frame.reset_index(drop=True).to_parquet(temp, index=False, engine="pyarrow")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as temp:
        frame.to_csv(temp, index=False, lineterminator="\n")


def find_local_file(path: str, key: str, hint: str = "") -> Path:
    """A local model file: as given, else under $AI_CACHE_ROOT. CharaForge never downloads.

    `key` names the parameter that gave the path, so that the error points at what to fix.
    """

    candidates = [Path(path)] if path else []
    if path and not Path(path).is_absolute() and os.environ.get("AI_CACHE_ROOT"):
        candidates.append(Path(os.environ["AI_CACHE_ROOT"]) / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(candidate) for candidate in candidates) or "no path given"
    message = f"{key}: file not found (looked at {looked}); CharaForge never downloads weights"
    raise ConfigError(f"{message}: {hint}" if hint else message)
