"""Pure-ASGI middleware (no BaseHTTPMiddleware: it would buffer streams and break SSE).

* :class:`PathNormalizeMiddleware` collapses ``//`` in paths (the official client turns an
  endpoint ending in ``/`` into ``/v1//caption``) and drops a trailing slash, so no route ever
  needs a redirect.
* :class:`BodyLimitMiddleware` refuses bodies over the cap with 413: at once when
  ``Content-Length`` says so, and otherwise by counting the bytes as they stream in (chunked
  uploads, lying headers).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moondream_server.api.errors import render_error

_SLASHES = re.compile(r"/{2,}")


class PathNormalizeMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            new = _SLASHES.sub("/", path)
            if len(new) > 1 and new.endswith("/"):
                new = new.rstrip("/") or "/"
            if new != path:
                scope = dict(scope)
                scope["path"] = new
                raw: Any = scope.get("raw_path")
                if isinstance(raw, bytes | bytearray):
                    raw_new = re.sub(rb"/{2,}", b"/", bytes(raw))
                    if len(raw_new) > 1 and raw_new.endswith(b"/"):
                        raw_new = raw_new.rstrip(b"/") or b"/"
                    scope["raw_path"] = raw_new
        await self.app(scope, receive, send)


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit:,} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        path: str = scope["path"]
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await render_error(path, 400, "invalid Content-Length header")(scope, receive, send)
                    return
                if declared > limit:
                    await render_error(path, 413, BodyTooLargeError(limit).detail, code="request_too_large")(
                        scope, receive, send
                    )
                    return

        received = 0
        overflow = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise BodyTooLargeError(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow:
                return  # our own 413 goes out below instead of whatever the app made of it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            response = render_error(path, 413, BodyTooLargeError(limit).detail, code="request_too_large")
            await response(scope, receive, send)
