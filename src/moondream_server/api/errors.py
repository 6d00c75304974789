"""Errors and their HTTP rendering.

Two body shapes, chosen by the path:

* ``/v1/...`` (cloud family): ``{"error": {"message", "type", "param", "code"}}``
* everything else (seed family): ``{"detail": "..."}`` (for 422: the list of problems)

Status codes: 400 bad input, 401 auth, 404/405 routing, 413 too large, 422 validation,
429 queue full (Retry-After), 503 not ready (Retry-After), 504 deadline, 500 anything unexpected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moondream_server.api.images import ImageError
from moondream_server.engine.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    NotReadyError,
    QueueFullError,
)

log = logging.getLogger(__name__)

_V1_TYPES = {
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
    503: "service_unavailable",
    504: "timeout_error",
}


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


def is_v1_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


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
    if is_v1_path(path):
        body: dict[str, Any] = {
            "error": {
                "message": message,
                "type": _V1_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                "param": param,
                "code": code,
            }
        }
    else:
        body = {"detail": message if seed_detail is None else seed_detail}
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
