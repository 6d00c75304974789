"""Work follows the client (live server): a request whose client leaves frees its slot or queue
place within one scheduler step, whether it was streamed, not streamed, running or queued."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from moondream_server.engine.batched import BatchedEngine
from moondream_server.engine.scheduler import Scheduler
from tests.api.support import IMAGES, LiveServer, file_data_url, tiny_settings

STEP_S = 0.03  # each forward step is slowed to this, so "within one step" is measurable
LONG = {"temperature": 0.0, "max_tokens": 1500}


@pytest.fixture
def slow_server(start_server: Callable[..., LiveServer], never_stop_checkpoint: Path) -> Iterator[LiveServer]:
    srv = start_server(tiny_settings(model=str(never_stop_checkpoint), max_batch_size=1, max_queue=2))
    engine = cast(BatchedEngine, srv.engine)
    assert engine.runtime is not None
    forward = engine.runtime.forward

    def slow_forward(items: Any) -> Any:
        time.sleep(STEP_S)
        return forward(items)

    engine.runtime.forward = slow_forward  # type: ignore[method-assign]
    yield srv


def scheduler(srv: LiveServer) -> Scheduler:
    s = cast(BatchedEngine, srv.engine).scheduler
    assert s is not None
    return s


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def send_request(srv: LiveServer, path: str, body: dict[str, Any]) -> socket.socket:
    """A raw HTTP request, so the test decides exactly when the client goes away."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {got[:300]!r}"
        got += chunk
    return got


def leave_and_count_steps(srv: LiveServer, sock: socket.socket, freed: Callable[[], bool]) -> int:
    """Close the client's socket; the scheduler steps taken until ``freed()`` holds."""
    s = scheduler(srv)
    before = s.stats.steps
    sock.close()
    wait_for(freed, timeout=10)
    return s.stats.steps - before


def caption(stream: bool) -> dict[str, Any]:
    return {"image_url": file_data_url(IMAGES[0]), "stream": stream, "settings": LONG}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_running_request_whose_client_left_frees_its_slot(slow_server: LiveServer, stream: bool) -> None:
    s = scheduler(slow_server)
    cancelled = s.stats.cancelled
    sock = send_request(slow_server, "/v1/caption", caption(stream))
    wait_for(lambda: s.active_count == 1 and s.stats.steps > 0)
    if stream:
        read_until(sock, b'"completed": false')
    else:
        steps = s.stats.steps
        wait_for(lambda: s.stats.steps >= steps + 3)  # decoding, not only admitted
    steps = leave_and_count_steps(slow_server, sock, lambda: s.active_count == 0)
    assert steps <= 2, f"the slot was freed after {steps} steps"  # the one under way, then reaped
    assert s.stats.cancelled == cancelled + 1
    assert s.stats.completed == 1  # the warm-up only: nothing ran to its last token


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_queued_request_whose_client_left_leaves_the_queue(slow_server: LiveServer, stream: bool) -> None:
    s = scheduler(slow_server)
    running = send_request(slow_server, "/v1/caption", caption(True))
    read_until(running, b'"completed": false')
    queued = send_request(slow_server, "/v1/query", {"question": "q", "stream": stream, "settings": LONG})
    wait_for(lambda: s.queue_depth == 1)
    steps = leave_and_count_steps(slow_server, queued, lambda: s.queue_depth == 0)
    assert steps <= 2, f"the queue place was freed after {steps} steps"
    assert s.stats.cancelled_in_queue == 1
    # The running request was not disturbed: it still streams.
    running.settimeout(5)
    assert read_until(running, b'"completed": false')
    running.close()
    wait_for(lambda: s.active_count == 0)
