"""Liveness and readiness. Open even when API keys are configured, so they show no filesystem
paths: a model served from a local folder appears by the folder's name."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from moondream_server.engine.base import Engine


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    ready: bool
    model_loaded: bool
    model: str
    revision: str | None
    device: str
    dtype: str
    precision: str | None = Field(
        None, description="What was chosen for this machine: number formats and the decode kernel."
    )
    engine: str
    queue_depth: int | None = Field(None, description="Requests waiting for the model.")
    requests: dict[str, int] | None = Field(
        None,
        description="Engine counters: completed, failed, interrupted (cancelled/deadline), expired_in_queue.",
    )
    error: str | None = Field(None, description="Why loading failed, if it did.")


class ReadyResponse(BaseModel):
    ready: bool
    detail: str | None = None


router = APIRouter(tags=["health"])


def public_model_name(model: str) -> str:
    """A Hub repo id as it is; a local folder (what the loader would read from disk) by its name."""
    path = Path(model).expanduser()
    if path.is_absolute() or path.exists() or model.startswith((".", "~")):
        return path.resolve().name or model
    return model


def redact_paths(text: str, model: str) -> str:
    """An error message with the model folder's path (as given and resolved) replaced by its name."""
    name = public_model_name(model)
    if name == model:
        return text
    for form in sorted({str(Path(model).expanduser().resolve()), model}, key=len, reverse=True):
        text = text.replace(form, name)
    return text


def _load_error(request: Request) -> str | None:
    engine: Engine = request.app.state.engine
    error = engine.load_error
    return None if error is None else redact_paths(str(error), request.app.state.settings.model)


def _draining(request: Request) -> bool:
    drain = getattr(request.app.state, "drain", None)
    return bool(drain is not None and drain.draining)


def _health(request: Request) -> HealthResponse:
    engine: Engine = request.app.state.engine
    info = engine.info
    ready = engine.is_ready() and not _draining(request)
    error = _load_error(request)
    return HealthResponse(
        ready=ready,
        model_loaded=engine.is_ready(),
        model=public_model_name(info.model_id),
        revision=info.revision,
        device=info.device,
        dtype=info.dtype,
        precision=info.precision,
        engine=request.app.state.settings.engine,
        queue_depth=engine.queue_depth,
        requests=dict(engine.stats),
        error=error,
    )


@router.get("/health", response_model=HealthResponse, summary="Liveness")
async def health(request: Request) -> HealthResponse:
    """The process is up. Says which model is (being) served and whether it is ready."""
    return _health(request)


@router.get("/v1/health", response_model=HealthResponse, include_in_schema=False)
async def health_v1(request: Request) -> HealthResponse:
    return _health(request)


_READY_RESPONSES: dict[int | str, dict[str, object]] = {
    503: {
        "model": ReadyResponse,
        "description": "Not ready: the model is loading or warming up (or failed), or the server shuts down.",
    }
}


@router.get("/health/ready", response_model=ReadyResponse, responses=_READY_RESPONSES, summary="Readiness")
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up, 503 (with Retry-After) before and while the
    server shuts down."""
    engine: Engine = request.app.state.engine
    if _draining(request):
        body = ReadyResponse(ready=False, detail="the server is shutting down").model_dump()
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    if engine.is_ready():
        return JSONResponse(ReadyResponse(ready=True).model_dump(exclude_none=True))
    error = _load_error(request)
    detail = "the model is loading" if error is None else f"the model failed to load: {error}"
    return JSONResponse(
        ReadyResponse(ready=False, detail=detail).model_dump(), status_code=503, headers={"Retry-After": "5"}
    )


@router.get("/v1/health/ready", response_model=ReadyResponse, include_in_schema=False)
async def ready_v1(request: Request) -> JSONResponse:
    return await ready(request)
