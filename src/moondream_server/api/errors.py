"""Errors and their HTTP rendering.

Each surface has its own error body shape, chosen by the request's path (the longest registered
prefix wins; a surface registers its prefix and shape through :func:`register_error_shape`):

* cloud ``/v1/...`` and OpenAI: ``{"error": {"message", "type", "param", "code"}}``
  (:func:`openai_style_body`, the shape Moondream Cloud took from OpenAI);
* Ollama ``/api/...``: ``{"error": "..."}``;
* everything else (seed routes, unknown paths): ``{"detail": "..."}`` (for 422: the list of
  problems), FastAPI's own shape.

Status codes: 400 bad input, 401 auth, 404/405 routing, 413 too large, 422 validation,
429 queue full (Retry-After), 501 skill not available, 503 not ready (Retry-After),
504 deadline, 500 anything unexpected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moondream_server.api.images import ImageError
from moondream_server.engine.base import Engine
from moondream_server.engine.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
)

log = logging.getLogger(__name__)

_OPENAI_STYLE_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_implemented_error",
    503: "service_unavailable",
    504: "timeout_error",
}


@dataclass(frozen=True)
class ErrorInfo:
    """An error about to be rendered, in whatever shape the path's surface uses."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    detail: Any = None  # for 422: the list of validation problems


# A surface's error body: the JSON value of the response.
ErrorBody = Callable[[ErrorInfo], Any]


def openai_style_body(error: ErrorInfo) -> dict[str, Any]:
    status = error.status
    kind = _OPENAI_STYLE_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def detail_body(error: ErrorInfo) -> dict[str, Any]:
    return {"detail": error.message if error.detail is None else error.detail}


_SHAPES: dict[str, ErrorBody] = {}


def register_error_shape(prefix: str, body: ErrorBody) -> None:
    """Paths equal to ``prefix`` or under ``prefix/`` render their errors with ``body``."""
    _SHAPES[prefix.rstrip("/")] = body


def error_body_for(path: str) -> ErrorBody:
    best = -1
    shape: ErrorBody = detail_body
    for prefix, body in _SHAPES.items():
        if (path == prefix or path.startswith(prefix + "/")) and len(prefix) > best:
            best, shape = len(prefix), body
    return shape


class ApiError(Exception):
    """An error raised by the API layer itself, with everything needed to render it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


def render_error(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    seed_detail: Any = None,
) -> JSONResponse:
    body = error_body_for(path)(ErrorInfo(status, message, code, param, seed_detail))
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def engine_error_response(path: str, exc: EngineError) -> JSONResponse:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, QueueFullError):
        return render_error(path, 429, msg, code="queue_full", headers=_retry_after(exc.retry_after_s))
    if isinstance(exc, NotReadyError):
        return render_error(path, 503, msg, code="model_not_ready", headers=_retry_after(exc.retry_after_s))
    if isinstance(exc, DeadlineExceededError):
        return render_error(path, 504, msg, code="deadline_exceeded")
    if isinstance(exc, InvalidRequestError):
        return render_error(path, 400, msg, code="invalid_request")
    log.error("unmapped engine error: %r", exc)
    return render_error(path, 500, "internal engine error", code="engine_error")


def _loc_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts)


def validation_response(path: str, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        problems.append({"type": err.get("type"), "loc": list(err.get("loc", ())), "msg": err.get("msg")})
    first = problems[0] if problems else {"loc": [], "msg": "invalid request", "type": None}
    param = _loc_name(tuple(first["loc"] or ())) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return render_error(
        path, 422, message, code=str(first.get("type") or "invalid"), param=param, seed_detail=problems
    )


def install_exception_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return render_error(
            request.url.path, exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers
        )

    async def on_image_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ImageError)
        if exc.status == 429:  # the in-flight pixel budget: overload, like a full queue
            engine: Engine = request.app.state.engine
            headers = _retry_after(engine.retry_after_s())
            return render_error(
                request.url.path, 429, exc.message, code="image_budget_full", param=exc.param, headers=headers
            )
        code = "image_too_large" if exc.status == 413 else "invalid_image"
        return render_error(request.url.path, exc.status, exc.message, code=code, param=exc.param)

    async def on_engine_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineError)
        return engine_error_response(request.url.path, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_response(request.url.path, exc)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return render_error(
            request.url.path, exc.status_code, str(exc.detail), code=None, headers=exc.headers or None
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return render_error(request.url.path, 500, "internal server error", code="internal_error")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ImageError, on_image_error)
    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
