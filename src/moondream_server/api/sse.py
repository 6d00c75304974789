"""Server-sent events for streaming caption/query, via ``sse-starlette``.

Wire format (what the official client parses): one ``data: {"chunk": "...", "completed": false}``
event per generated piece, flushed as it is generated, then
``data: {"chunk": "", "completed": true, "request_id": "..."}``. Events end with a blank line.

The first piece is awaited *before* the response starts, so every error known up to then
(queue full, not ready, deadline, invalid request) is a real HTTP status. An error after that
can only be reported in-band: the final event then carries an ``error`` object as well.
When the client disconnects, sse-starlette cancels the generator and the engine's iterator is
closed, which stops the generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse

from moondream_server.engine.errors import EngineError

log = logging.getLogger(__name__)


def _event(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload)}


async def single_piece(text: str) -> AsyncIterator[str]:
    """A finished text as a one-piece stream (query with reasoning is not streamed token by token)."""
    if text:
        yield text


async def stream_response(pieces: AsyncIterator[str], request_id: str) -> EventSourceResponse:
    """Await the first piece (errors propagate as exceptions), then stream the rest as SSE."""
    aclose = getattr(pieces, "aclose", None)
    try:
        first: str | None = await anext(pieces)
    except StopAsyncIteration:
        first = None
    except BaseException:
        if aclose is not None:
            await aclose()
        raise

    async def events() -> AsyncIterator[dict[str, str]]:
        final: dict[str, Any] = {"chunk": "", "completed": True, "request_id": request_id}
        try:
            if first is not None:
                yield _event({"chunk": first, "completed": False})
                try:
                    async for piece in pieces:
                        yield _event({"chunk": piece, "completed": False})
                except EngineError as exc:
                    final["error"] = {"message": str(exc) or type(exc).__name__, "type": type(exc).__name__}
                except Exception:
                    log.exception("stream %s failed", request_id)
                    final["error"] = {"message": "internal server error", "type": "server_error"}
            yield _event(final)
        finally:
            if aclose is not None:
                await aclose()

    return EventSourceResponse(events(), sep="\n", headers={"X-Request-ID": request_id})
