"""Ingest: validate and normalise a folder of images; quarantine what cannot be used.

Every readable image becomes an RGB PNG (EXIF orientation applied, alpha composited on the
configured background, long side at most `max_side`) named by the hash of its bytes. Anything
unusable goes to the quarantine table with one human-readable reason and the run goes on. Inputs
are only ever read.

Identical normalised images share one `image_id` and one PNG, but the manifest keeps one row per
source file (so every input is accounted for); `dedupe` puts rows that share an `image_id` in one
cluster as exact duplicates and keeps exactly one of them.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from charaforge.config import IngestConfig
from charaforge.io import atomic_path, sha256_bytes, write_bytes, write_parquet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
MANIFEST_COLUMNS = [
    "image_id",
    "image_path",
    "source_path",
    "source_sha256",
    "width",
    "height",
    "sidecar_text",
    "source_group",
]
QUARANTINE_COLUMNS = ["source_path", "reason"]


class Rejected(Exception):
    """A source file that cannot be used; the message is the quarantine reason."""


@dataclass
class IngestSummary:
    images: int  # manifest rows (one per accepted source file)
    unique_images: int  # distinct normalised images (distinct image_id)
    quarantined: int
    ignored: (
        int  # files that are not images by extension (sidecars, notes): neither kept nor rejected
    )


def portable_path(path: str | Path) -> str:
    """A POSIX path relative to the current directory (the repository root when stages run)."""
    return Path(os.path.relpath(os.path.abspath(path), os.getcwd())).as_posix()


def walk_files(source: Path) -> list[Path]:
    """Every file under `source` in sorted order; symlinked folders followed once (no loops).

    Hidden files and folders (`.git`, `.dvc`, `.DS_Store`) are skipped.
    """
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> None:
        info = folder.stat()
        key = (info.st_dev, info.st_ino)
        if key in seen:
            log.warning("skipping %s: already visited (symlink loop or alias)", folder)
            return
        seen.add(key)
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                visit(entry)
            elif entry.is_file() or entry.is_symlink():
                files.append(entry)

    visit(source)
    return files


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on `background`."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greyscale: PIL's convert("RGB") would clip at 255, so rescale first.
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max() > 255):
            pixels = pixels / 257.0
        elif image.mode == "F" and pixels.max() <= 1.0:
            pixels = pixels * 255.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def normalise_image(data: bytes, config: IngestConfig) -> Image.Image:
    """Decode, orient, convert and downscale one image; raise Rejected with a reason."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise Rejected(f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise Rejected("not a readable image (content is not in a known image format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise Rejected(f"unreadable image header: {error}") from None
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > config.max_pixels:
        raise Rejected(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"max_pixels {config.max_pixels}"
        )
    if min(width, height) < config.min_side:
        raise Rejected(
            f"too small: {width}x{height}, shorter side below min_side {config.min_side}"
        )
    try:
        image.seek(0)  # animated GIF / multi-page TIFF: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image, config.background)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise Rejected(f"truncated or corrupt image data: {error}") from None
    if max(image.size) > config.max_side:
        scale = config.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes without metadata chunks: they depend on the pixels only."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _read_sidecar(image_path: Path) -> str | None:
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    return sidecar.read_text(encoding="utf-8", errors="replace").strip()


def ingest_folder(source: str | Path, out_dir: str | Path, config: IngestConfig) -> IngestSummary:
    """Normalise every image under `source` into `out_dir`; write manifest and quarantine tables."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"data.source {source} is not a folder")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL LOAD_TRUNCATED_IMAGES is on: truncated files would be accepted")
    rows: list[dict] = []
    rejected: list[dict] = []
    ignored = 0
    with atomic_path(out_dir / "images") as images_dir:
        images_dir.mkdir(parents=True)
        written: set[str] = set()
        for path in walk_files(source):
            relative = path.relative_to(source)
            source_path = portable_path(path)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
                continue
            try:
                if not path.exists():
                    raise Rejected("broken symlink (target does not exist)")
                try:
                    data = path.read_bytes()
                except OSError as error:
                    raise Rejected(f"cannot read file: {error.strerror}") from None
                image = normalise_image(data, config)
            except Rejected as reason:
                log.warning("quarantined %s: %s", source_path, reason)
                rejected.append({"source_path": source_path, "reason": str(reason)})
                continue
            encoded = png_bytes(image)
            image_id = sha256_bytes(encoded)[:16]
            if image_id not in written:
                write_bytes(images_dir / f"{image_id}.png", encoded)
                written.add(image_id)
            rows.append(
                {
                    "image_id": image_id,
                    "image_path": portable_path(out_dir / "images" / f"{image_id}.png"),
                    "source_path": source_path,
                    "source_sha256": sha256_bytes(data),
                    "width": image.width,
                    "height": image.height,
                    "sidecar_text": _read_sidecar(path),
                    "source_group": relative.parts[0] if len(relative.parts) > 1 else "",
                }
            )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).astype(
        {"width": "int64", "height": "int64"}
    )
    quarantine = pd.DataFrame(rejected, columns=QUARANTINE_COLUMNS)
    write_parquet(out_dir / "manifest.parquet", manifest)
    write_parquet(out_dir / "quarantine.parquet", quarantine)
    summary = IngestSummary(
        images=len(manifest),
        unique_images=int(manifest["image_id"].nunique()),
        quarantined=len(quarantine),
        ignored=ignored,
    )
    log.info(
        "ingest: %d images (%d unique), %d quarantined, %d non-image files ignored",
        summary.images,
        summary.unique_images,
        summary.quarantined,
        summary.ignored,
    )
    return summary
