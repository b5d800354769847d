"""Ingest: validate and normalise a folder of images; quarantine what cannot be used.

Every readable image becomes an RGB PNG (EXIF orientation applied, alpha composited on the
configured background, long side at most `max_side`) named by the hash of its bytes. Anything
unusable goes to the quarantine table with one human-readable reason and the run goes on. Inputs
are only ever read.

Every mode is normalised: an embedded ICC profile is applied (to sRGB), 16-bit and float images are
rescaled rather than clipped, CMYK / YCbCr / LAB / palette / bilevel images are converted, and
transparency (alpha, LA, palette tRNS) is composited on the background. Each rejected file gets
one `kind` (a short code, counted in `summary.json`) and one human-readable `reason`.

Identical normalised images share one `image_id` and one PNG, but the manifest keeps one row per
source file (so every input is accounted for); `dedupe` puts rows that share an `image_id` in one
cluster as exact duplicates and keeps exactly one of them.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from charaforge.config import IngestConfig
from charaforge.core.files import atomic_path, sha256_bytes, write_bytes, write_json, write_parquet

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
QUARANTINE_COLUMNS = ["source_path", "kind", "reason"]
# Quarantine kinds, each with what it means (summary.json counts them).
QUARANTINE_KINDS = {
    "empty": "zero-byte file",
    "not_image": "content is not in a known image format",
    "truncated": "image data ends early or is corrupt",
    "too_small": "shorter side below data.ingest.min_side",
    "decompression_bomb": "more pixels than data.ingest.max_pixels",
    "broken_symlink": "symbolic link to nothing",
    "symlink_loop": "symbolic links that lead back to themselves, or a folder already read",
    "not_regular_file": "a FIFO, socket or device with an image name",
    "unreadable": "the file cannot be read (permissions, I/O error)",
}


class Rejected(Exception):
    """A source file that cannot be used; the message is the quarantine reason."""

    def __init__(self, reason: str, kind: str = "truncated") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass
class IngestSummary:
    images: int  # manifest rows (one per accepted source file)
    unique_images: int  # distinct normalised images (distinct image_id)
    quarantined: int
    # files that are not images by extension (sidecars, notes): neither kept nor rejected
    ignored: int
    quarantined_by_kind: dict[str, int] = field(default_factory=dict)


def portable_path(path: str | Path) -> str:
    """A POSIX path relative to the current directory (the repository root when stages run)."""
    return Path(os.path.relpath(os.path.abspath(path), os.getcwd())).as_posix()


def walk_files(source: Path, loops: list[Path] | None = None) -> list[Path]:
    """Every file under `source` in sorted order; symlinked folders followed once (no loops).

    Hidden files and folders (`.git`, `.dvc`, `.DS_Store`) are skipped. A symlinked folder that
    leads to a folder already read (a loop, or an alias) is appended to `loops` when given.
    """
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> None:
        info = folder.stat()
        key = (info.st_dev, info.st_ino)
        if key in seen:
            log.warning("skipping %s: already visited (symlink loop or alias)", folder)
            if loops is not None:
                loops.append(folder)
            return
        seen.add(key)
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:  # a symlink loop on a folder name: stat fails with ELOOP
                is_dir = False
            if is_dir:
                visit(entry)
            elif entry.is_symlink() or entry.is_file() or entry.exists():
                files.append(entry)

    visit(source)
    return files


def _apply_icc(image: Image.Image) -> Image.Image:
    """Pixels in sRGB when the file carries an ICC profile (CMYK and wide-gamut files do)."""
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK", "L", "LAB"):
        return image
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        target = ImageCms.createProfile("sRGB")
        output = "RGBA" if image.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(image, source, target, outputMode=output)
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as error:
        # A broken profile is not a broken image: fall back to PIL's plain conversion.
        log.debug("ignoring unusable ICC profile: %s", error)
        return image


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on `background`."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greyscale: PIL's convert("RGB") would clip at 255, so rescale first.
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max() > 255):
            pixels = pixels / 257.0
        elif image.mode == "F" and pixels.max() <= 1.0:
            pixels = pixels * 255.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if image.mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        image = ImageCms.applyTransform(image, lab_to_srgb)
    else:
        image = _apply_icc(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


SIGNATURES = (
    (b"\xff\xd8", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _signature(data: bytes) -> str | None:
    """The image format the first bytes claim, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES if data.startswith(magic)), None)


def normalise_image(data: bytes, config: IngestConfig) -> Image.Image:
    """Decode, orient, convert and downscale one image; raise Rejected with a reason."""
    if not data:
        raise Rejected("empty file (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # corrupt EXIF / TIFF tags: not fatal
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise Rejected(f"decompression bomb: {error}", "decompression_bomb") from None
    except UnidentifiedImageError:
        claimed = _signature(data)
        if claimed:
            # The magic bytes say image, the rest does not parse: damage, not a wrong file.
            raise Rejected(
                f"truncated or corrupt image header: starts like {claimed} but does not parse",
                "truncated",
            ) from None
        raise Rejected(
            "not a readable image (content is not in a known image format)", "not_image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise Rejected(f"truncated or corrupt image header: {error}", "truncated") from None
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > config.max_pixels:
        raise Rejected(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
            f"max_pixels {config.max_pixels}",
            "decompression_bomb",
        )
    if min(width, height) < config.min_side:
        raise Rejected(
            f"too small: {width}x{height}, shorter side below min_side {config.min_side}",
            "too_small",
        )
    try:
        image.seek(0)  # animated GIF / multi-page TIFF: the first frame
        with warnings.catch_warnings():
            # Corrupt EXIF is reported as a warning and ignored: the pixels are still good.
            warnings.simplefilter("ignore", UserWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image, config.background)
    except Image.DecompressionBombError as error:
        raise Rejected(f"decompression bomb: {error}", "decompression_bomb") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise Rejected(f"truncated or corrupt image data: {error}", "truncated") from None
    if max(image.size) > config.max_side:
        scale = config.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
    return image


def read_source(path: Path) -> bytes:
    """The bytes of one source file, or Rejected with the reason it cannot be read.

    Only regular files are opened: reading a FIFO with an image name would block forever.
    """
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise Rejected("symlink loop (the link leads back to itself)", "symlink_loop") from None
        if path.is_symlink():
            raise Rejected("broken symlink (target does not exist)", "broken_symlink") from None
        raise Rejected(f"cannot read file: {error.strerror}", "unreadable") from None
    if not stat.S_ISREG(info.st_mode):
        raise Rejected(
            "not a regular file (a FIFO, socket or device with an image name)", "not_regular_file"
        )
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise Rejected(f"cannot read file: {error.strerror}", "unreadable") from None


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
    loops: list[Path] = []
    files = walk_files(source, loops)
    for folder in loops:
        rejected.append(
            {
                "source_path": portable_path(folder),
                "kind": "symlink_loop",
                "reason": "symlink loop: a symlinked folder that leads to a folder already read",
            }
        )
    with atomic_path(out_dir / "images") as images_dir:
        images_dir.mkdir(parents=True)
        written: set[str] = set()
        for path in files:
            relative = path.relative_to(source)
            source_path = portable_path(path)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
                continue
            try:
                data = read_source(path)
                image = normalise_image(data, config)
            except Rejected as reason:
                log.warning("quarantined %s: %s", source_path, reason)
                rejected.append(
                    {"source_path": source_path, "kind": reason.kind, "reason": str(reason)}
                )
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
    quarantine = (
        pd.DataFrame(rejected, columns=QUARANTINE_COLUMNS)
        .sort_values("source_path", kind="stable")
        .reset_index(drop=True)
    )
    write_parquet(out_dir / "manifest.parquet", manifest)
    write_parquet(out_dir / "quarantine.parquet", quarantine)
    by_kind = {kind: int(count) for kind, count in quarantine["kind"].value_counts().items()}
    summary = IngestSummary(
        images=len(manifest),
        unique_images=int(manifest["image_id"].nunique()),
        quarantined=len(quarantine),
        ignored=ignored,
        quarantined_by_kind=dict(sorted(by_kind.items())),
    )
    write_json(
        out_dir / "summary.json",
        {
            "images": summary.images,
            "unique_images": summary.unique_images,
            "quarantined": summary.quarantined,
            "quarantined_by_kind": summary.quarantined_by_kind,
            "ignored_non_image_files": summary.ignored,
            "kinds": QUARANTINE_KINDS,
        },
    )
    log.info(
        "ingest: %d images (%d unique), %d quarantined, %d non-image files ignored",
        summary.images,
        summary.unique_images,
        summary.quarantined,
        summary.ignored,
    )
    return summary
