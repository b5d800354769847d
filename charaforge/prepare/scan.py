"""Scan: account for every entry of a source folder without trusting any of them.

DVC hashes every file of a dependency folder before a stage runs, and a user's folder can hold
anything: a dangling symlink, a symlink loop, a FIFO (reading it blocks forever), a device, a
socket, a name that is not UTF-8, a sparse multi-GB file. So the `scan` stage (always run) walks
`data.source` itself and writes one table DVC can always hash; `ingest` depends on that table,
not on the raw folder, and reads only the files it lists as kept.

The walk never follows a symlink into a folder (a link to `/` would walk the machine), never
opens anything but a regular file, and checks a file's size before reading a byte of it. Every
entry gets a row: kept, quarantined with a kind and a reason, or ignored with a reason (hidden
files, non-image files, hidden or symlinked folders). Names of any bytes are recorded escaped
(`escape_name`) and, for opening, as their raw bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from charaforge.config import IngestConfig

# Suffixes ingest decodes (Pillow 12 reads AVIF).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif"}
)
# Image formats a user may expect to work that ingest cannot decode: quarantined, by name.
UNSUPPORTED_SUFFIXES = {
    ".svg": "SVG is a vector format; rasterise it to PNG first",
    ".svgz": "SVG is a vector format; rasterise it to PNG first",
    ".heic": "HEIC is not supported; convert it to PNG or JPEG first",
    ".heif": "HEIF is not supported; convert it to PNG or JPEG first",
    ".psd": "PSD is not supported; export it to PNG first",
    ".jxl": "JPEG XL is not supported; convert it to PNG first",
}
# Files ingest reads besides images (captions next to an image): hashed, so a changed caption
# changes the scan table and re-runs ingest.
SIDECAR_SUFFIXES = frozenset({".txt"})

SCAN_COLUMNS = [
    "source_path",  # escaped, portable: what every table and log line shows
    "raw_relative_path",  # the name's bytes relative to the source folder (to open it)
    "entry_type",  # file, folder, symlink, fifo, socket, char_device, block_device, other
    "status",  # kept, quarantined, ignored, sidecar
    "kind",  # quarantine or ignore kind; "" for kept
    "reason",
    "size",  # bytes (lstat; a symlink's target size when it points at a regular file)
    "sha256",  # content hash of kept files and sidecars; "" otherwise
]
SCAN_KINDS = {
    "broken_symlink": "symbolic link to nothing",
    "symlink_loop": "symbolic links that lead back to themselves, or to a folder being read",
    "not_regular_file": "a FIFO, socket or device: never opened",
    "unreadable": "the file or folder cannot be read (permissions, I/O error)",
    "too_large": "bigger than data.ingest.max_file_bytes: never read",
    "unsupported_format": "an image format ingest cannot decode (SVG, HEIC, ...)",
    "hidden": "a name starting with '.': ignored",
    "not_image_name": "no image extension: ignored (captions .txt are read beside their image)",
    "symlinked_folder": "a symbolic link to a folder: not followed",
}


def escape_name(raw: bytes | str) -> str:
    """A printable, unambiguous text form of a file name of any bytes.

    Valid UTF-8 stays as it is; undecodable bytes and control characters (a newline in a name
    would split a log line) become `\\xNN`, and a backslash becomes `\\\\`, so two different
    names never share an escaped form.
    """
    text = os.fsdecode(raw) if isinstance(raw, bytes) else raw
    parts = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape could not decode
            parts.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            parts.append(f"\\x{code:02x}")
        elif char == "\\":
            parts.append("\\\\")
        elif 0xD800 <= code <= 0xDFFF:
            parts.append(f"\\u{code:04x}")
        else:
            parts.append(char)
    return "".join(parts)


def portable_path(path: str | Path) -> str:
    """A POSIX path relative to the current directory (the repository root when stages run)."""
    return Path(os.path.relpath(os.path.abspath(path), os.getcwd())).as_posix()


@dataclass
class ScanSummary:
    entries: int
    kept: int
    quarantined: int
    ignored: int


class _Walker:
    def __init__(self, source: Path, config: IngestConfig) -> None:
        self.source = source
        self.config = config
        self.prefix = escape_name(portable_path(source))
        self.rows: list[dict] = []
        self.ancestors: set[tuple[int, int]] = set()

    def add(self, relative: bytes, entry_type: str, status: str, kind: str = "", **extra) -> None:
        self.rows.append(
            {
                "source_path": f"{self.prefix}/{escape_name(relative)}",
                "raw_relative_path": relative,
                "entry_type": entry_type,
                "status": status,
                "kind": kind,
                "reason": extra.get("reason", ""),
                "size": int(extra.get("size", 0)),
                "sha256": extra.get("sha256", ""),
            }
        )

    def walk(self, folder: bytes, relative: bytes) -> None:
        info = os.lstat(folder)
        key = (info.st_dev, info.st_ino)
        self.ancestors.add(key)
        try:
            names = sorted(os.listdir(folder))
        except OSError as error:
            self.add(
                relative or b".",
                "folder",
                "quarantined",
                "unreadable",
                reason=f"cannot list folder: {error.strerror}",
            )
            return
        for name in names:
            self.entry(
                os.path.join(folder, name), os.path.join(relative, name) if relative else name
            )
        self.ancestors.discard(key)

    def entry(self, path: bytes, relative: bytes) -> None:
        name = os.path.basename(relative)
        try:
            info = os.lstat(path)
        except OSError as error:  # vanished between listing and lstat
            self.add(relative, "other", "quarantined", "unreadable", reason=error.strerror)
            return
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            if name.startswith(b"."):
                self.add(relative, "folder", "ignored", "hidden", reason="hidden folder: not read")
                return
            self.walk(path, relative)
            return
        if stat.S_ISLNK(mode):
            self.symlink(path, relative)
            return
        if not stat.S_ISREG(mode):
            self.special(relative, mode)
            return
        self.regular(path, relative, info.st_size, "file")

    def symlink(self, path: bytes, relative: bytes) -> None:
        try:
            target = os.stat(path)  # follows the link: the only place the walk does
        except OSError as error:
            if error.errno == errno.ELOOP:
                self.add(
                    relative,
                    "symlink",
                    "quarantined",
                    "symlink_loop",
                    reason="symlink loop (the link leads back to itself)",
                )
            elif error.errno == errno.ENOENT:
                self.add(
                    relative,
                    "symlink",
                    "quarantined",
                    "broken_symlink",
                    reason="broken symlink (target does not exist)",
                )
            else:
                self.add(relative, "symlink", "quarantined", "unreadable", reason=error.strerror)
            return
        if stat.S_ISDIR(target.st_mode):
            if (target.st_dev, target.st_ino) in self.ancestors:
                self.add(
                    relative,
                    "symlink",
                    "quarantined",
                    "symlink_loop",
                    reason="symlink loop: a symlinked folder that leads to a folder being read",
                )
            else:
                self.add(
                    relative,
                    "symlink",
                    "ignored",
                    "symlinked_folder",
                    reason="symlink to a folder: not followed (copy or link its files instead)",
                )
            return
        if not stat.S_ISREG(target.st_mode):
            self.special(relative, target.st_mode, via_link=True)
            return
        self.regular(path, relative, target.st_size, "symlink")

    def special(self, relative: bytes, mode: int, via_link: bool = False) -> None:
        what = (
            "FIFO"
            if stat.S_ISFIFO(mode)
            else "socket"
            if stat.S_ISSOCK(mode)
            else "character device"
            if stat.S_ISCHR(mode)
            else "block device"
            if stat.S_ISBLK(mode)
            else "special file"
        )
        entry_type = {
            "FIFO": "fifo",
            "socket": "socket",
            "character device": "char_device",
            "block device": "block_device",
        }.get(what, "other")
        link = "a symlink to " if via_link else ""
        self.add(
            relative,
            "symlink" if via_link else entry_type,
            "quarantined",
            "not_regular_file",
            reason=f"not a regular file ({link}a {what}): never opened",
        )

    def regular(self, path: bytes, relative: bytes, size: int, entry_type: str) -> None:
        name = os.path.basename(relative)
        suffix = os.fsdecode(os.path.splitext(name)[1]).lower()
        if name.startswith(b"."):
            self.add(relative, entry_type, "ignored", "hidden", reason="hidden file", size=size)
            return
        if suffix in UNSUPPORTED_SUFFIXES:
            self.add(
                relative,
                entry_type,
                "quarantined",
                "unsupported_format",
                reason=UNSUPPORTED_SUFFIXES[suffix],
                size=size,
            )
            return
        sidecar = suffix in SIDECAR_SUFFIXES
        if suffix not in IMAGE_SUFFIXES and not sidecar:
            self.add(
                relative,
                entry_type,
                "ignored",
                "not_image_name",
                reason=f"not an image by extension ({escape_name(suffix) or 'none'})",
                size=size,
            )
            return
        limit = self.config.max_file_bytes
        if size > limit:
            self.add(
                relative,
                entry_type,
                "quarantined" if not sidecar else "ignored",
                "too_large",
                reason=f"{size} bytes exceeds data.ingest.max_file_bytes {limit}: not read",
                size=size,
            )
            return
        try:
            digest, read = hash_capped(path, limit)
        except OSError as error:
            self.add(
                relative,
                entry_type,
                "quarantined",
                "unreadable",
                reason=f"cannot read file: {error.strerror}",
                size=size,
            )
            return
        if read > limit:  # a file that reports a small size and keeps giving (/proc-like)
            self.add(
                relative,
                entry_type,
                "quarantined",
                "too_large",
                reason=f"gives more than data.ingest.max_file_bytes {limit} bytes: not read",
                size=size,
            )
            return
        self.add(relative, entry_type, "sidecar" if sidecar else "kept", size=read, sha256=digest)


def hash_capped(path: bytes | str | Path, limit: int, chunk: int = 1 << 20) -> tuple[str, int]:
    """SHA-256 and length of a regular file, reading at most `limit + 1` bytes.

    Opened with O_NONBLOCK so that a file swapped for a FIFO after the check never blocks.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    digest = hashlib.sha256()
    read = 0
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file any more")
        while read <= limit and (block := handle.read(min(chunk, limit + 1 - read))):
            digest.update(block)
            read += len(block)
    return digest.hexdigest(), read


def scan_folder(source: str | Path, config: IngestConfig) -> pd.DataFrame:
    """One row per entry under `source` (see SCAN_COLUMNS), in the order of their raw bytes."""
    source = Path(source)
    walker = _Walker(source, config)
    walker.walk(os.fsencode(source), b"")
    table = pd.DataFrame(walker.rows, columns=SCAN_COLUMNS)
    return table.astype({"size": "int64"}).reset_index(drop=True)


def summarise(table: pd.DataFrame) -> ScanSummary:
    counts = table["status"].value_counts()
    return ScanSummary(
        entries=len(table),
        kept=int(counts.get("kept", 0)),
        quarantined=int(counts.get("quarantined", 0)),
        ignored=int(counts.get("ignored", 0) + counts.get("sidecar", 0)),
    )
