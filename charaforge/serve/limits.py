"""What every route of the server shares: its settings, the bearer token, request bodies that
refuse NaN/Infinity and unencodable text, a cost budget, bounded upload sizes, and 422 bodies that
never echo unbounded or non-JSON input.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, model_validator

from charaforge.core import layout

# Module level: FastAPI resolves the (string) annotations of endpoints against module globals.
_BEARER = HTTPBearer(auto_error=False)

# A 422 quotes at most this much of what it refuses.
_ECHO_LIMIT = 120
_MAX_ERRORS = 20


@dataclass
class ServerSettings:
    base_dir: Path = Path(layout.BASE_DIR)
    lora_dir: Path = Path(layout.LORAS_DIR)
    # Trained candidates (`<candidate>@<step>`) and the champion are served from these; None
    # serves only the LoRA folder.
    train_dir: Path | None = None
    reports_dir: Path | None = None
    devices: list[str] = field(default_factory=lambda: ["auto"])
    memory: str = "device"
    queue_size: int = 8
    token: str | None = None
    max_size: int = 1024
    max_steps: int = 100
    max_batch: int = 4
    # pixels x steps x images of one request: 512x512, 30 steps, 4 images by default (a
    # 1024x1024, 100-step batch of 4 is 13x that, minutes of one worker).
    max_cost: int = 512 * 512 * 30 * 4
    # A render running longer is cancelled at its next sampling step (504).
    request_timeout_s: float = 300.0
    max_upload_bytes: int = 16 * 1024 * 1024  # one decoded image
    max_upload_pixels: int = 4096 * 4096
    max_body_bytes: int = 64 * 1024 * 1024
    scheduler: str = "euler"
    cpu_threads: int | None = None  # torch threads of each worker (None: torch's default)
    outputs_dir: Path | None = None  # batch and /api/v1 outputs (None: $AI_CACHE_ROOT or outputs/)
    jobs_db: Path | None = None  # the batch jobs' SQLite file (None: inside the outputs folder)
    ui: bool = False  # mount the Gradio web UI at /ui (`charaforge serve` does by default)
    tracking_uri: str | None = None  # MLflow store whose runs the UI's Training tab shows
    # The project's params.yaml and pipeline folders: POST /api/v1/eval/report renders the
    # sweep's fixed prompts and poses for one LoRA and scores them with the score stage's scorers.
    params_file: Path | None = None
    dataset_dir: Path = Path(layout.DATASET_DIR)
    pose_dir: Path = Path(layout.POSE_DIR)
    ingest_dir: Path = Path(layout.INGEST_DIR)


def bearer_guard(settings: ServerSettings) -> Any:
    """A dependency refusing requests without the token (when one is set); `bearer` in any case."""

    def authorised(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if settings.token is None:
            return
        if credentials is None or not secrets.compare_digest(
            credentials.credentials.encode(), settings.token.encode()
        ):
            raise HTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    return Depends(authorised)


def _check_text(value: Any, where: str) -> None:
    """Strings must be valid Unicode (a lone surrogate cannot be encoded, logged or tokenised);
    floats must be finite (JSON NaN/Infinity are not numbers a render can use)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: text holds an unpaired surrogate") from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: numbers must be finite")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}" if isinstance(key, str) else where)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_text(item, where)


class Body(BaseModel):
    """The base of every request body: unknown keys, NaN/Infinity and lone surrogates are 422."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _clean_input(cls, data: Any) -> Any:
        _check_text(data, "body")
        return data


def _printable(value: Any) -> str:
    """At most _ECHO_LIMIT characters of an input, ASCII-escaped (always JSON-serialisable)."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value[: _ECHO_LIMIT * 4])
    text = ascii(value) if not isinstance(value, int | bool) else str(value)
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "...(truncated)"


def _safe_errors(errors: Any) -> list[dict[str, Any]]:
    safe = []
    for error in list(errors)[:_MAX_ERRORS]:
        item: dict[str, Any] = {
            "loc": [
                part if isinstance(part, int) else _printable(part).strip("'")
                for part in error.get("loc", ())
            ],
            "msg": _printable(str(error.get("msg", "")))[1:-1][:400],
            "type": str(error.get("type", "")),
        }
        if "input" in error and error.get("type") != "json_invalid":
            item["input"] = _printable(error["input"])
        safe.append(item)
    return safe


def install_error_handlers(app: FastAPI, settings: ServerSettings) -> None:
    """422 bodies that quote their input only truncated and escaped; a body size limit (413)."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _safe_errors(error.errors())}, status_code=422)

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return JSONResponse(
                {"detail": f"request body over {settings.max_body_bytes} bytes"}, status_code=413
            )
        return await call_next(request)


def check_cost(
    settings: ServerSettings, width: int, height: int, steps: int, images: int
) -> list[str]:
    """The limits of one request, as 422 reasons (empty when it fits)."""
    problems = []
    if max(width, height) > settings.max_size:
        problems.append(f"width/height: at most {settings.max_size}")
    if steps > settings.max_steps:
        problems.append(f"steps: at most {settings.max_steps}")
    if images > settings.max_batch:
        problems.append(f"batch_size: at most {settings.max_batch} images per request")
    cost = width * height * steps * images
    if not problems and cost > settings.max_cost:
        problems.append(
            f"cost: {width}x{height} px x {steps} steps x {images} images = {cost} is over this "
            f"server's budget of {settings.max_cost} (fewer steps, images or pixels)"
        )
    return problems


def decode_image(data: str, settings: ServerSettings, what: str = "image") -> Image.Image:
    """A base64 image (optionally a `data:image/...;base64,` URL) checked for size, pixel count
    and content before use; ValueError with the reason otherwise."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > settings.max_upload_bytes * 4 // 3 + 4:
        raise ValueError(f"{what}: over {settings.max_upload_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not valid base64") from None
    return open_image_bytes(raw, settings, what)


def open_image_bytes(raw: bytes, settings: ServerSettings, what: str = "image") -> Image.Image:
    """Uploaded bytes as an RGB/L image after checking size, pixel count and decodability."""
    if len(raw) > settings.max_upload_bytes:
        raise ValueError(f"{what}: over {settings.max_upload_bytes} bytes")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            if probe.format not in ("PNG", "JPEG", "WEBP", "BMP"):
                raise ValueError(f"{what}: PNG, JPEG, WebP or BMP only (got {probe.format})")
            width, height = probe.size
            if width * height > settings.max_upload_pixels:
                raise ValueError(
                    f"{what}: {width}x{height} is over {settings.max_upload_pixels} px"
                )
            probe.load()
            image = probe.convert("RGBA") if probe.mode in ("RGBA", "LA", "P") else probe.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValueError(f"{what}: not a readable image") from None
    return image
