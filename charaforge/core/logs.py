"""Logging set-up in one place: our format, other libraries quiet, progress that suits the output.

Every entry point (the stage runner, the command line) calls `configure_logging`. It imports
nothing heavy, so `charaforge --help` stays fast; libraries that log through their own switches
(diffusers, transformers, absl/MediaPipe, TensorFlow-style C++ logs) are told through environment
variables they read when they are imported later.

- Other libraries' loggers are raised to WARNING (their INFO lines are progress notes for their
  developers), and a few known notices a user cannot act on are dropped altogether
  (`QUIET_MESSAGES`): open_clip writes `INFO root: Loaded ... model config.` to the root logger,
  diffusers notes float32 upcasts, bitsandbytes reports which kernels it found.
- tqdm bars: on a terminal they stay bars. When stderr is not a terminal (a DVC or CI log), tqdm
  would repaint with carriage returns, which a log file keeps as one line of hundreds of
  characters; there every repaint becomes its own line, at most every `LOG_PROGRESS_SECONDS` and
  at most `LOG_LINE_WIDTH` characters wide.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO (and DEBUG) output is theirs, not the user's.
NOISY_LOGGERS = (
    "absl",
    "alembic",
    "bitsandbytes",
    "diffusers",
    "filelock",
    "fsspec",
    "httpcore",
    "httpx",
    "matplotlib",
    "mediapipe",
    "numexpr",
    "onnxruntime",
    "open_clip",
    "peft",
    "PIL",
    "torch",
    "transformers",
    "urllib3",
)
# Loggers quieter still: bitsandbytes warns on every CPU run that it falls back to its CPU kernels.
ERROR_ONLY_LOGGERS = ("bitsandbytes",)
# Notices at WARNING or below that repeat in every run and ask nothing of the user.
QUIET_MESSAGES = (
    # open_clip's stand-in CLIP is random by design (a real model gets a weights path).
    re.compile(r"^No pretrained weights loaded for model .* initialized randomly"),
    re.compile(r"^All model checkpoint weights were used"),  # transformers
)
# Lines that native code (MediaPipe's C++ graph through Abseil logging, TensorFlow Lite) writes
# straight to file descriptor 2, past Python's logging: `W0000 00:00:... file.cc:114] ...`.
NATIVE_NOISE = re.compile(
    r"([IW]\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\]|INFO: Created TensorFlow Lite"
    r"|WARNING: All log messages before absl::InitializeLog)"
)
# Environment switches read by libraries at import time (set only if the user did not).
QUIET_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow-style C++ logging (MediaPipe's Abseil build)
    "GLOG_minloglevel": "2",  # glog (MediaPipe's graph start-up lines)
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "BITSANDBYTES_NOWELCOME": "1",
}
LOG_LINE_WIDTH = 120
MAX_LINE = 200  # a repaint longer than this (a very long description) is cut
LOG_PROGRESS_SECONDS = 15


class QuietFilter(logging.Filter):
    """Drops the known notices of `QUIET_MESSAGES` unless they come from charaforge itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("charaforge") or record.levelno > logging.WARNING:
            return True
        if record.name == "root" and record.levelno < logging.WARNING:
            return False  # open_clip's progress notes; charaforge never logs to the root logger
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in QUIET_MESSAGES)


class LineStream:
    """A text stream that turns carriage-return repaints into lines (for non-terminal logs).

    tqdm writes `\\r<bar>` for every repaint; a log file would keep them glued into one line.
    Here every repaint is a line of its own, ended at once (not at the next write): another
    process writing to the same log (the world stage's two workers) never continues it. The `\\n`
    tqdm writes when a bar closes is then already written and dropped; an over-long line is cut.
    """

    def __init__(self, stream: TextIO, width: int = MAX_LINE) -> None:
        self.stream = stream
        self.width = width
        self.ended = False  # the last write was a repaint, ended here

    def write(self, text: str) -> int:
        if not text:
            return 0  # tqdm writes empty strings between repaints
        written = len(text)
        if "\r" in text:
            lines = []
            for part in text.split("\r"):
                if not part.strip():
                    continue
                line = part if "\n" in part else part[: self.width].rstrip(" ")
                lines.append(line if line.endswith("\n") else line + "\n")
            self.stream.write("".join(lines))
            self.ended = self.ended or bool(lines)
        else:
            if self.ended and text.startswith("\n"):
                text = text[1:]  # the closing newline of a bar whose line is already ended
            self.ended = False
            self.stream.write(text)
        return written

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


def brief_metrics(metrics: Mapping[str, Any], prefix: str, width: int = 90) -> str:
    """Metrics as one short log line (a log line stays under `MAX_LINE` characters; the files
    hold them all): `<prefix>loss_first` -> `<prefix>loss_last`, then the other values, lowest
    first (the weakest accuracies are the news); other losses, logit scales and values that are
    not numbers left out."""
    parts = []
    if f"{prefix}loss_first" in metrics:
        loss = f"loss {metrics[f'{prefix}loss_first']:.3g} -> {metrics[f'{prefix}loss_last']:.3g}"
        parts.append(loss)
    scores = {
        key.removeprefix(prefix): value
        for key, value in metrics.items()
        if "loss" not in key and "scale" not in key and isinstance(value, int | float)
    }
    for name, value in sorted(scores.items(), key=lambda item: (item[1], item[0])):
        parts.append(f"{name} {value:.3g}")
    line = ""
    for part in parts:
        if len(line) + len(part) + 2 > width:
            return line + ", ..."
        line = f"{line}, {part}" if line else part
    return line


def quiet_environment() -> None:
    """Set the libraries' own quiet switches (before they are imported)."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if not _is_terminal(sys.stderr):
        # tqdm reads TQDM_* variables as defaults for every bar, also bars other libraries make.
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_PROGRESS_SECONDS))
        os.environ.setdefault("TQDM_NCOLS", str(LOG_LINE_WIDTH))


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(level: int = logging.INFO) -> None:
    """Our log format on stderr, other libraries at WARNING, known noise dropped (idempotent)."""
    quiet_environment()
    if not _is_terminal(sys.stderr) and not isinstance(sys.stderr, LineStream):
        sys.stderr = LineStream(sys.stderr)  # type: ignore[assignment]
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, QuietFilter) for f in handler.filters):
            handler.addFilter(QuietFilter())
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, level))
    for name in ERROR_ONLY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.captureWarnings(True)  # warnings.warn goes through logging (and its filters) too
    logging.getLogger("py.warnings").setLevel(logging.WARNING)
    # It logs a full traceback for every locked SQLite call; tracking.StageRun reports a lock in
    # one warning and retries.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _without_noise(line: str, end: str = "\n") -> str:
    """The line without a native notice (which may follow a partly written Python line)."""
    found = NATIVE_NOISE.search(line)
    kept = line[: found.start()] if found else line
    return kept + end if kept or not found else ""


class NativeNoiseFilter:
    """While open, everything written to file descriptor 2 (by native code as well as Python)
    passes through a pipe; a thread forwards every line except the known `NATIVE_NOISE` to the
    real stderr, as it comes. Keep it open for the whole life of the native object: MediaPipe's
    graph threads write long after the call that started them."""

    def __init__(self) -> None:
        self.descriptor: int | None = None

    def open(self) -> NativeNoiseFilter:
        if self.descriptor is not None:
            return self
        try:
            descriptor = sys.__stderr__.fileno() if sys.__stderr__ else 2
        except (AttributeError, ValueError, OSError):
            return self  # no real descriptor (an embedding host): leave it alone
        sys.stderr.flush()
        self.descriptor = descriptor
        self.original = os.dup(descriptor)
        read_end, write_end = os.pipe()
        os.dup2(write_end, descriptor)
        os.close(write_end)
        self.thread = threading.Thread(target=self._forward, args=(read_end,), daemon=True)
        self.thread.start()
        return self

    def _forward(self, read_end: int) -> None:
        with (
            open(read_end, "rb", buffering=0) as pipe,
            open(self.original, "wb", buffering=0, closefd=False) as out,
        ):
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    out.write(_without_noise(line.decode(errors="replace")).encode())
            out.write(_without_noise(pending.decode(errors="replace"), end="").encode())

    def close(self) -> None:
        if self.descriptor is None:
            return
        sys.stderr.flush()
        os.dup2(self.original, self.descriptor)  # the pipe's last write end closes here
        self.thread.join(timeout=10)
        os.close(self.original)
        self.descriptor = None

    def __enter__(self) -> NativeNoiseFilter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
