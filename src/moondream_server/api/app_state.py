"""What the app holds for its routes: the settings, and the engine once it can take a request."""

from __future__ import annotations

from fastapi import Request

from moondream_server.engine.base import Engine
from moondream_server.settings import Settings


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def ready_engine(request: Request) -> Engine:
    """The engine, or NotReadyError / QueueFullError at once, before the request's image is decoded."""
    engine: Engine = request.app.state.engine
    # The engine's own admission stays the authority; this only saves the decoding work under overload.
    engine.check_capacity()
    return engine
