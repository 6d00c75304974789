"""Connection timeouts against a live server, with raw sockets: slow-loris headers and bodies,
idle sockets and idle keep-alive connections are closed; patient but steady clients are served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol

from moondream_server.api import connection
from tests.api.support import LiveServer, tiny_settings

HEADERS_S, BODY_S, IDLE_S = 1.0, 2.0, 1.0


@pytest.fixture(scope="module", params=["h11", "httptools"])
def strict(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """Both of uvicorn's HTTP implementations: httptools where installed (uvicorn[standard]),
    h11 otherwise (a plain ``pip install uvicorn``)."""
    if request.param == "h11":
        base: type = H11Protocol
    else:
        base = pytest.importorskip("uvicorn.protocols.http.httptools_impl").HttpToolsProtocol
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(connection, "_BASE", base)
        srv = LiveServer(
            tiny_settings(header_timeout_s=HEADERS_S, body_timeout_s=BODY_S, keep_alive_timeout_s=IDLE_S)
        ).start()
    assert issubclass(srv._server.config.http, base)  # type: ignore[arg-type]
    yield srv
    srv.stop()


def _connect(srv: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the socket, and when that happened."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic()
        data += chunk


def test_an_idle_socket_is_closed_after_the_header_deadline(strict: LiveServer) -> None:
    with _connect(strict) as sock:
        start = time.monotonic()
        data, closed = _read_until_closed(sock)
    assert data == b""
    assert HEADERS_S * 0.9 <= closed - start < HEADERS_S + 2


def test_half_sent_headers_are_closed(strict: LiveServer) -> None:
    with _connect(strict) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.5)
        sock.sendall(b"X-Slow: 1\r\n")  # trickling header lines do not extend the deadline
        data, closed = _read_until_closed(sock)
    assert data == b""
    assert closed - start < HEADERS_S + 2


def test_a_body_that_never_arrives_gets_408_and_a_close(strict: LiveServer) -> None:
    with _connect(strict) as sock:
        sock.sendall(
            b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{}"
        )
        start = time.monotonic()
        data, closed = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"did not arrive within 2 s" in data
    assert BODY_S * 0.9 <= closed - start < BODY_S + 2


def test_an_idle_keep_alive_connection_is_closed(strict: LiveServer) -> None:
    with _connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        start = time.monotonic()
        _, closed = _read_until_closed(sock)
    assert closed - start < IDLE_S + 2


def test_a_half_sent_second_request_is_closed(strict: LiveServer) -> None:
    with _connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        data, closed = _read_until_closed(sock)
    assert data == b"" and closed - start < HEADERS_S + 2


def test_a_slow_but_steady_client_is_served(strict: LiveServer) -> None:
    """Headers in pieces within their deadline, then a body that takes longer than the header
    deadline but less than the body deadline: the header timer no longer runs once they are in."""
    body = b'{"question": "hi", "settings": {"temperature": 0, "max_tokens": 3}}'
    with _connect(strict) as sock:
        sock.sendall(b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.3)
        sock.sendall(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), len(body) // 3 + 1):
            time.sleep(0.5)
            sock.sendall(body[i : i + len(body) // 3 + 1])
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200"), reply


def test_many_slow_sockets_are_all_closed_and_the_server_keeps_answering(strict: LiveServer) -> None:
    socks = [_connect(strict) for _ in range(200)]
    try:
        for i, sock in enumerate(socks):
            if i % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 1")  # half-sent
        with _connect(strict) as probe:
            probe.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert probe.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + HEADERS_S + 5
        for sock in socks:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            assert sock.recv(1) == b""
    finally:
        for sock in socks:
            sock.close()
