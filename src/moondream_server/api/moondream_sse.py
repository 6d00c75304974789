"""Moondream's streaming format (cloud ``/v1`` and seed routes), as Server-Sent Events via
``sse-starlette``.

Wire format (what the official client parses): one ``data: {"chunk": "...", "completed": false}``
event per generated piece, flushed as it is generated, then
``data: {"chunk": "", "completed": true, "request_id": "..."}``. Events end with a blank line.

The response starts only once the generation's first piece exists (see ``serving.stream``), so
errors known until then are real HTTP statuses. An error after that can only be reported
in-band: the final event then carries an ``error`` object as well. When the client disconnects,
sse-starlette cancels the generator and the generation is closed, which stops it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse

from moondream_server.api.openapi_docs import SSE_EVENT_SCHEMA
from moondream_server.api.serving import Generation
from moondream_server.engine.errors import EngineError

log = logging.getLogger(__name__)

SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "JSON, or with `stream: true` a `text/event-stream` of "
            '`data: {"chunk": "...", "completed": false}` events ending with '
            '`data: {"chunk": "", "completed": true, "request_id": "..."}`.'
        ),
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    }
}


def _event(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload)}


def chunk_stream(generation: Generation, request_id: str) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        final: dict[str, Any] = {"chunk": "", "completed": True, "request_id": request_id}
        try:
            try:
                async for piece in generation.pieces():
                    yield _event({"chunk": piece, "completed": False})
            except EngineError as exc:
                final["error"] = {"message": str(exc) or type(exc).__name__, "type": type(exc).__name__}
            except Exception:
                log.exception("stream %s failed", request_id)
                final["error"] = {"message": "internal server error", "type": "server_error"}
            yield _event(final)
        finally:
            await generation.aclose()

    return EventSourceResponse(events(), sep="\n", headers={"X-Request-ID": request_id})
