"""The uvicorn server of ``moondream-server``: its configuration from the settings, and the server
object (uvicorn's, with a drain before shutdown)."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from moondream_server.api.connection import http_protocol
from moondream_server.api.shutdown import GracefulServer
from moondream_server.settings import Settings


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws="none",
        http=http_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # any float works
        # What is left after the drain (GracefulServer) are idle connections: close them quickly.
        timeout_graceful_shutdown=5,
    )


def server(app: FastAPI, settings: Settings) -> GracefulServer:
    return GracefulServer(uvicorn_config(app, settings), app.state.drain, settings.shutdown_grace_s)
