"""Work follows the client: a request whose client disconnects before the response starts is
cancelled, so its queue place or batch slot is freed instead of running to its last token.

Starlette notices a disconnect only while a response is being streamed. Between reading the body
and starting the response (the whole life of a non-streamed request, and a streamed one's wait
for its first piece, queued or not) nothing listens. This pure-ASGI middleware does: once the
app has read the whole body, a watcher waits for ``http.disconnect``; if it arrives before the
response starts, the app's task is cancelled. Cancellation reaches the engine's ``await``, whose
``finally`` marks the request cancelled; the scheduler drops it (waiting or active) at its next
step. Once the response has started the watcher stops, and streaming responses (sse-starlette)
watch for the disconnect themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class CancelOnDisconnectMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app_task: asyncio.Task[None] | None = None
        watcher: asyncio.Task[None] | None = None
        started = False
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            if not started and app_task is not None:
                disconnected = True
                app_task.cancel()

        async def receive_body() -> Message:
            nonlocal watcher
            message = await receive()
            body_done = message["type"] == "http.request" and not message.get("more_body", False)
            if body_done and watcher is None and not started:
                watcher = asyncio.create_task(watch(), name="disconnect-watch")
            return message

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                _stop(watcher)
            await send(message)

        async def run_app() -> None:
            await self.app(scope, receive_body, send_started)

        app_task = asyncio.create_task(run_app())
        try:
            await app_task
        except asyncio.CancelledError:
            if not disconnected:
                raise  # the server is cancelling us: not ours to swallow
            log.info("client left before the response of %s %s; its work was cancelled", *_what(scope))
        finally:
            _stop(watcher)
            if not app_task.done():
                app_task.cancel()
                with contextlib.suppress(BaseException):
                    await app_task


def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()


def _what(scope: Scope) -> tuple[str, str]:
    return str(scope.get("method", "")), str(scope.get("path", ""))
