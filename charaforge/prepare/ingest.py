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
from charaforge.core.progress import progress
from charaforge.errors import ConfigError
from charaforge.prepare.scan import (
    SCAN_KINDS,
    escape_name,
    portable_path,
    scan_folder,
)

log = logging.getLogger(__name__)

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
IGNORED_COLUMNS = ["source_path", "kind", "reason"]
# Quarantine kinds, each with what it means (summary.json counts them).
QUARANTINE_KINDS = {
    **{kind: SCAN_KINDS[kind] for kind in ("too_large", "unsupported_format")},
    "bad_aspect": "longer side more than data.ingest.max_aspect times the shorter",
    "changed": "the file changed between the scan and ingest",
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
    if max(width, height) > config.max_aspect * min(width, height):
        # A 20480x100 strip passes min_side but would enter the dataset at 1024x5.
        raise Rejected(
            f"aspect ratio {max(width, height) / min(width, height):.1f}:1 ({width}x{height}) "
            f"exceeds max_aspect {config.max_aspect}",
            "bad_aspect",
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


def read_listed(path: Path, expected_sha256: str, limit: int) -> bytes:
    """The bytes of one file the scan kept, or Rejected when it changed since the scan.

    Opened without blocking and checked to be a regular file again: the folder is the user's and
    may change between the scan and now.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise Rejected(f"cannot read file: {error.strerror}", "unreadable") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise Rejected("not a regular file any more (changed since the scan)", "changed")
        try:
            data = handle.read(limit + 1)
        except OSError as error:
            raise Rejected(f"cannot read file: {error.strerror}", "unreadable") from None
    if sha256_bytes(data) != expected_sha256:
        raise Rejected("content changed since the scan (run again)", "changed")
    return data


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes without metadata chunks: they depend on the pixels only."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _sidecars(scan: pd.DataFrame) -> dict[bytes, tuple[str, bytes]]:
    """Caption files the scan hashed, by the raw relative path of the image beside them."""
    found: dict[bytes, tuple[str, bytes]] = {}
    for row in scan[scan["status"] == "sidecar"].itertuples():
        stem = os.path.splitext(row.raw_relative_path)[0]
        found[stem] = (row.sha256, row.raw_relative_path)
    return found


def _read_sidecar(source: Path, image: bytes, sidecars: dict, limit: int) -> str | None:
    listed = sidecars.get(os.path.splitext(image)[0])
    if listed is None:
        return None
    try:
        data = read_listed(source / os.fsdecode(listed[1]), listed[0], limit)
    except Rejected as reason:
        log.warning("caption beside %s not read: %s", escape_name(image), reason)
        return None
    return data.decode("utf-8", errors="replace").strip()


def check_source(source: str | Path) -> Path:
    """data.source as a folder, or a one-line ConfigError naming the key."""
    path = Path(source)
    if path.is_dir():
        return path
    what = "is a file, not a folder" if path.exists() else "does not exist"
    raise ConfigError(f"data.source: {escape_name(str(source))} {what}")


def ingest_folder(
    source: str | Path,
    out_dir: str | Path,
    config: IngestConfig,
    scan: pd.DataFrame | None = None,
) -> IngestSummary:
    """Normalise every kept image under `source` into `out_dir`; write the tables.

    `scan` is the `scan` stage's table (charaforge.prepare.scan); without it the folder is scanned
    here. Only files the scan kept are opened, and only if their bytes still match its hash. The
    whole `out_dir` (images, manifest, quarantine, ignored, summary) is written under a temporary
    name and swapped in at the end, so it never disagrees with its own manifest.
    """
    source, out_dir = check_source(source), Path(out_dir)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL LOAD_TRUNCATED_IMAGES is on: truncated files would be accepted")
    if scan is None:
        scan = scan_folder(source, config)
    listed = scan[scan["status"] == "quarantined"]
    rejected = [
        {"source_path": row.source_path, "kind": row.kind, "reason": row.reason}
        for row in listed.itertuples()
    ]
    ignored_rows = scan[scan["status"].isin(["ignored", "sidecar"])]
    ignored = pd.DataFrame(
        {
            "source_path": ignored_rows["source_path"],
            "kind": ignored_rows["kind"].where(ignored_rows["status"] != "sidecar", "sidecar"),
            "reason": ignored_rows["reason"].where(
                ignored_rows["status"] != "sidecar", "caption file, read beside its image"
            ),
        },
        columns=IGNORED_COLUMNS,
    )
    sidecars = _sidecars(scan)
    rows: list[dict] = []
    with atomic_path(out_dir) as staging:
        images_dir = staging / "images"
        images_dir.mkdir(parents=True)
        written: set[str] = set()
        kept = scan[scan["status"] == "kept"]
        for entry in progress(kept.itertuples(), len(kept), "ingest"):
            relative = os.fsdecode(entry.raw_relative_path)
            try:
                data = read_listed(source / relative, entry.sha256, config.max_file_bytes)
                image = normalise_image(data, config)
            except Rejected as reason:
                log.warning("quarantined %s: %s", entry.source_path, reason)
                rejected.append(
                    {"source_path": entry.source_path, "kind": reason.kind, "reason": str(reason)}
                )
                continue
            encoded = png_bytes(image)
            image_id = sha256_bytes(encoded)[:16]
            if image_id not in written:
                write_bytes(images_dir / f"{image_id}.png", encoded)
                written.add(image_id)
            parts = Path(relative).parts
            rows.append(
                {
                    "image_id": image_id,
                    "image_path": portable_path(out_dir / "images" / f"{image_id}.png"),
                    "source_path": entry.source_path,
                    "source_sha256": entry.sha256,
                    "width": image.width,
                    "height": image.height,
                    "sidecar_text": _read_sidecar(
                        source, entry.raw_relative_path, sidecars, config.max_file_bytes
                    ),
                    "source_group": escape_name(parts[0]) if len(parts) > 1 else "",
                }
            )
        summary = _write_tables(staging, rows, rejected, ignored)
    log.info(
        "ingest: %d images (%d unique), %d quarantined, %d non-image files ignored",
        summary.images,
        summary.unique_images,
        summary.quarantined,
        summary.ignored,
    )
    return summary


def _write_tables(
    out_dir: Path, rows: list[dict], rejected: list[dict], ignored: pd.DataFrame
) -> IngestSummary:
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
    write_parquet(out_dir / "ignored.parquet", ignored)
    by_kind = {kind: int(count) for kind, count in quarantine["kind"].value_counts().items()}
    ignored_by_kind = {kind: int(count) for kind, count in ignored["kind"].value_counts().items()}
    summary = IngestSummary(
        images=len(manifest),
        unique_images=int(manifest["image_id"].nunique()),
        quarantined=len(quarantine),
        ignored=len(ignored),
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
            "ignored_by_kind": dict(sorted(ignored_by_kind.items())),
            "kinds": {**SCAN_KINDS, **QUARANTINE_KINDS},
        },
    )
    return summary
