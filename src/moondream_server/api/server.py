"""The uvicorn server of ``moondream-server``: its configuration from the settings."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from moondream_server.api.connection import http_protocol
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
        timeout_graceful_shutdown=10,
    )
