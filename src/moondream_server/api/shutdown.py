"""Graceful shutdown: drain on SIGTERM, then cut what is still running, and say so on the wire.

On the first SIGTERM (or SIGINT) :class:`GracefulServer` does not stop uvicorn at once. It turns
the app's :class:`Drain` on: readiness answers 503 (load balancers stop sending), every new
request but the probes and ``/metrics`` gets 503 with ``Retry-After``, and requests in flight,
streams included, get ``shutdown_grace_s`` to finish. Whatever still runs then is cut by
:class:`DrainMiddleware`, which holds each request in a task of its own: a stream whose answer has
started gets a last event that says it was cut (never a silent truncation), a request whose
answer has not started gets 503. From the cut on, the middleware owns the end of the answer:
what the app still sends is dropped, so the cut event is the last thing on the wire however the
app's task ends (a stream's own error event when the engine stops under it, sse-starlette's
bare end of stream at exit, uvicorn's forced cancellation after its own timeout). Then uvicorn
shuts down as usual (lifespan: the engine stops) and the process exits 0. A second signal falls
through to uvicorn's own handling (immediate).

The cut event per stream format, chosen by the response's content type:

* ``text/event-stream`` (Moondream's chunks, OpenAI chat chunks):
  ``data: {"chunk": "", "completed": true, "request_id": ..., "finish_reason": "shutdown",
  "error": {"message", "type": "server_shutdown", "code": "server_shutdown"}}``. The official
  Moondream client ends its stream there; OpenAI clients raise on the ``error`` object.
* ``application/x-ndjson`` (Ollama): ``{"error": "...", "done": true, "done_reason": "shutdown"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moondream_server.api.errors import render_error

log = logging.getLogger(__name__)

CUT_MESSAGE = "the server is shutting down: this answer was cut off before it was complete"
# Probes and scrapes keep their own answers while draining (readiness says 503 by itself).
_STILL_SERVED = frozenset({"/health", "/v1/health", "/health/ready", "/v1/health/ready", "/metrics"})
_RETRY_AFTER = "5"  # a load balancer will have moved this client to another replica by then


class Drain:
    """One app's shutdown state: whether it drains, its requests in flight, the cut signal."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.running: set[asyncio.Task[None]] = set()  # the requests' app tasks, to cancel at the cut
        self.cut: set[asyncio.Task[None]] = set()  # those cancelled by the cut
        self._idle: asyncio.Event | None = None

    def idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
        return self._idle

    def enter(self) -> None:
        self.in_flight += 1
        self.idle_event().clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle_event().set()

    async def run(self, grace_s: float, cut_wait_s: float = 5.0) -> None:
        """Drain: refuse new work, give the work in flight ``grace_s``, then cut the rest."""
        self.draining = True
        log.info("shutting down: %d request(s) in flight get %g s to finish", self.in_flight, grace_s)
        try:
            await asyncio.wait_for(self.idle_event().wait(), grace_s)
            return
        except TimeoutError:
            pass
        log.warning("shutdown grace passed: cutting %d request(s) still running", self.in_flight)
        for task in list(self.running):
            self.cut.add(task)
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle_event().wait(), cut_wait_s)


def _cut_body(content_type: str, request_id: str | None) -> bytes:
    if content_type.startswith("application/x-ndjson"):
        return json.dumps({"error": CUT_MESSAGE, "done": True, "done_reason": "shutdown"}).encode() + b"\n"
    event: dict[str, Any] = {"chunk": "", "completed": True}
    if request_id is not None:
        event["request_id"] = request_id
    event["finish_reason"] = "shutdown"
    event["error"] = {"message": CUT_MESSAGE, "type": "server_shutdown", "code": "server_shutdown"}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _STILL_SERVED:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            response = render_error(
                scope["path"],
                503,
                "the server is shutting down; retry (another replica will answer)",
                code="shutting_down",
                headers={"Retry-After": _RETRY_AFTER, "Connection": "close"},
            )
            await response(scope, receive, send)
            return

        started: dict[str, Any] = {}
        ended = False
        task: asyncio.Future[None] | None = None

        async def tracked_send(message: Message) -> None:
            nonlocal ended
            if task in self.drain.cut:
                # Cut: whatever the app still sends (an error event of its own when the engine
                # stops under it, or a bare end of stream) would end the answer without saying
                # it was cut. The answer's end is the cut event, sent below.
                return
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                started["content_type"] = headers.get(b"content-type", b"").decode("latin-1")
                rid = headers.get(b"x-request-id")
                started["request_id"] = None if rid is None else rid.decode("latin-1")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        self.drain.enter()
        # The app runs in a task of its own, so that the cut can cancel it (its generation then
        # stops as when a client leaves) and this middleware still answers.
        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        self.drain.running.add(task)
        try:
            try:
                await task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if task not in self.drain.cut or (me is not None and me.cancelling()):
                    task.cancel()
                    if task in self.drain.cut and started and not ended:
                        await _send_cut(send, started)  # still say why the stream ends
                    raise  # cancelled from outside (uvicorn's forced exit), not cut
            if task not in self.drain.cut or ended:
                return
            if not started:
                response = render_error(
                    scope["path"],
                    503,
                    "the server shut down before the answer was ready; retry",
                    code="shutting_down",
                    headers={"Retry-After": _RETRY_AFTER, "Connection": "close"},
                )
                await response(scope, receive, send)
                return
            await _send_cut(send, started)
        finally:
            self.drain.running.discard(task)
            self.drain.cut.discard(task)
            self.drain.leave()


_STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


async def _send_cut(send: Send, started: dict[str, Any]) -> None:
    """End a started answer that was cut: a stream with its cut event, anything else as it is."""
    ctype = started["content_type"]
    body = _cut_body(ctype, started["request_id"]) if ctype.startswith(_STREAM_TYPES) else b""
    with contextlib.suppress(OSError, RuntimeError):  # the peer left / the server closed it
        await send({"type": "http.response.body", "body": body, "more_body": False})


class GracefulServer(uvicorn.Server):
    """uvicorn, with a drain in front of its shutdown (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = sig in (signal.SIGTERM, signal.SIGINT) and not self.drain.draining and not self.should_exit
        if not first or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self.drain.draining = True  # at once: the signal handler runs between two bytecodes
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run(self.grace_s)
        finally:
            # Not through handle_exit: uvicorn would re-raise the signal at the end (exit 143);
            # a completed drain is a clean exit.
            self.should_exit = True
