"""Connection timeouts uvicorn lacks: a deadline for a request's headers.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but lets a client that opens a
socket and sends nothing, or half a request line, hold it forever (slow loris). The protocol
classes here add one timer: whenever the connection waits for a request's headers (just opened,
or after a response), the headers must be complete within ``header_timeout_s`` or the socket is
closed. The body has its own deadline, enforced in the ASGI layer (``BodyLimitMiddleware``),
because uvicorn hands the body to the app as it arrives.

A subclass of uvicorn's own protocol (httptools when installed, as uvicorn's "auto" picks, else
h11) keeps everything else of uvicorn's HTTP handling unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    _BASE: type[asyncio.Protocol] = HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency of uvicorn[standard]
    _BASE = H11Protocol


class _HeaderDeadline:
    """Mixin over a uvicorn HTTP protocol (which provides ``loop``, ``transport`` and ``cycle``)."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _in_request(self) -> bool:
        """Headers of a request are in and its response is not finished yet."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._header_timer is not None and self._in_request():
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # Waiting for the next request again, unless a pipelined one has already started.
        if not self.transport.is_closing() and not self._in_request():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a deadline for request headers (uvicorn's ``http=``)."""
    return type(
        f"HeaderDeadline{_BASE.__name__}",
        (_HeaderDeadline, _BASE),
        {"header_timeout_s": header_timeout_s},
    )
