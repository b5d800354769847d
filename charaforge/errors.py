"""The one error contract: an expected failure is a `CharaForgeError`, reported in one line.

Every stage, the CLI and the server catch `CharaForgeError` at their edge and turn it into one
log line and exit code 2 (or an HTTP 4xx); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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
