"""The one error contract: an expected failure is a `CharaForgeError`, reported in one line.

Every stage, the CLI and the server catch `CharaForgeError` at their edge and turn it into one
log line and exit code 2 (or an HTTP 4xx); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class CharaForgeError(Exception):
    """An expected failure the user can fix: the message says what and how."""


class ConfigError(CharaForgeError, ValueError):
    """A configuration that cannot run: the message names the offending key."""


class MissingInputError(CharaForgeError, FileNotFoundError):
    """An input of a stage is missing, usually because an earlier stage has not run."""


def require_stage_output(path: object, stage: str) -> None:
    """Fail with "run stage X first" when an earlier stage's output is missing."""
    if not Path(str(path)).exists():
        raise MissingInputError(f"{path}: not found (run the `{stage}` stage first)")


# A full disk, a quota, a file-size limit: reported in one line by the stage edge, not a traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The attribute `core.files.atomic_path` sets on a disk error: the bytes its write had reached
# (deleted again by its clean-up), so the message can say how much room the write needs.
WRITTEN_BYTES = "charaforge_written_bytes"


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def disk_message(error: OSError) -> str:
    """One line: what could not be written, how much room is left there, and how much the write
    needs (at least what it had written when it failed; a partial output is never kept)."""
    path = Path(error.filename) if error.filename else Path.cwd()
    folder = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(folder).free
    if error.errno == errno.EFBIG:
        what = "file size limit reached (ulimit -f / RLIMIT_FSIZE)"
    else:
        what = "no space left on the device" if error.errno == errno.ENOSPC else "quota exceeded"
    written = getattr(error, WRITTEN_BYTES, 0)
    needs = f"; the write needs more than the {_size(written)} it had written" if written else ""
    return (
        f"{what} writing {path}: {free / 2**20:.1f} MiB free on that filesystem{needs}; "
        "free more space (or raise the limit) and run again"
    )
