"""What the app holds for its routes: the settings, and the engine once it can take a request."""

from __future__ import annotations

from fastapi import Request

from moondream_server.engine.base import Engine
from moondream_server.engine.errors import NotReadyError
from moondream_server.settings import Settings


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def ready_engine(request: Request) -> Engine:
    """The engine, or NotReadyError / QueueFullError at once, before the request's image is decoded."""
    engine: Engine = request.app.state.engine
    if not engine.is_ready():
        error = getattr(engine, "load_error", None)
        if error is not None:
            raise NotReadyError(f"the model failed to load: {error}", retry_after_s=60.0)
        raise NotReadyError()
    # The engine's own admission stays the authority; this only saves the decoding work under overload.
    check_capacity = getattr(engine, "check_capacity", None)
    if callable(check_capacity):
        check_capacity()
    return engine
