"""`charaforge serve`: the generation engine over HTTP (FastAPI under uvicorn).

The app is built in charaforge.serve.app (routes), .a1111 (/sdapi/v1), .limits (settings, token,
422 bodies, cost budget), .worker (the one device queue) and .render (prompt LoRAs, limits);
this module keeps the names callers import and runs the server.
"""

from __future__ import annotations

from charaforge.serve.app import DEFAULT_HOST, DEFAULT_PORT, Txt2ImgRequest, create_app
from charaforge.serve.batch import RemoteRows
from charaforge.serve.limits import ServerSettings
from charaforge.serve.worker import Service, Worker

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ServerSettings",
    "Service",
    "Txt2ImgRequest",
    "Worker",
    "create_app",
    "serve",
]


def serve(
    settings: ServerSettings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    batch_rows: RemoteRows | None = None,
) -> None:
    """Run the server until interrupted (`batch_rows`: see create_app)."""
    import uvicorn

    app = create_app(settings, batch_rows=batch_rows)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        app.state.batches.stop()
        app.state.service.stop()
