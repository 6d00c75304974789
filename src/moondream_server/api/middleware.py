"""Pure-ASGI middleware (no BaseHTTPMiddleware: it would buffer streams and break SSE).

* :class:`PathNormalizeMiddleware` collapses ``//`` in paths (the official client turns an
  endpoint ending in ``/`` into ``/v1//caption``) and drops a trailing slash, so no route ever
  needs a redirect.
* :class:`BodyLimitMiddleware` refuses bodies over the cap with 413: at once when
  ``Content-Length`` says so, and otherwise by counting the bytes as they stream in (chunked
  uploads, lying headers). It also gives the whole body a deadline (408 after it): a client
  that promises 100 bytes and sends 2 does not hold a request open forever.
"""

from __future__ import annotations

import asyncio
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


class BodyTimeoutError(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

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
                    await render_error(
                        path,
                        413,
                        BodyTooLargeError(limit).detail,
                        code="request_too_large",
                        headers={"Connection": "close"},
                    )(scope, receive, send)
                    return

        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout_s is None else loop.time() + self.body_timeout_s
        received = 0
        body_done = False
        refusal: HTTPException | None = None  # our own answer, instead of whatever the app made of it
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, refusal, body_done
            if body_done or deadline is None:
                message = await receive()  # the body is in: only a disconnect can come
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    assert self.body_timeout_s is not None
                    refusal = BodyTimeoutError(self.body_timeout_s)
                    raise refusal from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refusal = BodyTooLargeError(limit)
                    raise refusal
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not started:
            code = "request_too_large" if refusal.status_code == 413 else "request_timeout"
            # The rest of the body is unread: close rather than parse it as the next request.
            response = render_error(
                path, refusal.status_code, refusal.detail, code=code, headers={"Connection": "close"}
            )
            await response(scope, receive, send)
