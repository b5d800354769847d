"""Shared by the serving tests: a real uvicorn on a free loopback port, a workspace with a
selection report, and PNG helpers."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from PIL import Image

from charaforge.train.launch import free_local_port as free_port


@contextmanager
def running(app: object) -> Iterator[str]:
    """`app` served by uvicorn in a thread on 127.0.0.1; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def write_selection(reports_dir: Path, candidate: str, step: int, scale: float) -> None:
    """The part of the report stage's metrics.json that names the champion."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    champion = {"candidate": candidate, "step": step, "lora_scale": scale}
    (reports_dir / "metrics.json").write_text(json.dumps({"champion": champion}))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))
