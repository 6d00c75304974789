"""Overload on loopback against a server process: requests arriving at 10× the rate it can serve.

Every request is answered, with 200, 429, 503 or 504 only; a refusal is fast (p99 < 100 ms); and
the Retry-After it carries is within 2× of how long the requests then waiting really took to get
a slot.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.api.hostile import ServerProcess

SLOTS = 2
QUEUE = 4
OVERLOAD = 10  # offered load, as a multiple of the measured throughput
LOAD_S = 6.0  # how long requests keep arriving: over 100 refusals, so p99 is not just the slowest
# Each request runs to this many tokens (end-of-text is unreachable in this checkpoint): seconds in
# a slot, so a full queue takes several to drain and Retry-After is not just its 1 s floor.
TOKENS = 600
BODY = json.dumps({"question": "q", "settings": {"temperature": 0.0, "max_tokens": TOKENS}})


@pytest.fixture(scope="module")
def loaded_server(never_stop_checkpoint: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        [
            *("--model", str(never_stop_checkpoint), "--device", "cpu", "--dtype", "float32"),
            *("--max-batch-size", str(SLOTS), "--max-queue", str(QUEUE), "--threads", "1"),
            *("--log-level", "warning", "--request-timeout", "120"),
        ],
        env={"MOONDREAM_REVISION": ""},
    ).wait_ready()
    yield srv
    srv.stop()


@dataclass(eq=False)
class Call:
    """One request on a raw socket (no HTTP library: its overhead is not the server's)."""

    sock: socket.socket
    sent: float = 0.0
    head_at: float | None = None  # the response's head
    done_at: float | None = None
    data: bytes = b""
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    def read(self) -> None:
        chunk = self.sock.recv(65536)
        now = time.monotonic()
        if not chunk:
            self.done_at = now
            self.sock.close()
            return
        self.data += chunk
        if self.head_at is None and b"\r\n\r\n" in self.data:
            self.head_at = now
            lines = self.data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
            self.status = int(lines[0].split()[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}

    def started(self) -> float:
        """When it got its slot, on this clock: sent, plus its queue wait as the server measured
        it (time to the first token, less the prefill that followed the admission)."""
        metrics = json.loads(self.data.split(b"\r\n\r\n", 1)[1])["metrics"]
        return self.sent + (metrics["ttft_ms"] - metrics["prefill_time_ms"]) / 1000


def run_load(srv: ServerProcess, times: list[float]) -> list[Call]:
    """Send one request at each offset in ``times`` (seconds from now); read every answer."""
    request = (
        f"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n{BODY}"
    ).encode()
    calls = [Call(socket.create_connection(("127.0.0.1", srv.port), timeout=120)) for _ in times]
    start = time.monotonic()
    due = 0
    deadline = start + max(times) + 120
    while any(c.done_at is None for c in calls) and time.monotonic() < deadline:
        while due < len(calls) and time.monotonic() - start >= times[due]:
            calls[due].sock.sendall(request)
            calls[due].sent = time.monotonic()
            due += 1
        open_ = [c.sock for c in calls[:due] if c.done_at is None]
        wait = max(0.0, times[due] - (time.monotonic() - start)) if due < len(calls) else 0.5
        readable = select.select(open_, [], [], min(wait, 0.5))[0] if open_ else time.sleep(wait) or []
        for c in calls[:due]:
            if c.sock in readable:
                c.read()
    return calls


def test_ten_times_the_rate_it_can_serve(loaded_server: ServerProcess) -> None:
    # The server's throughput: SLOTS requests at once, each TOKENS long. Two rounds also let it
    # measure how long a request holds a slot.
    warm = run_load(loaded_server, [0.0] * SLOTS) + run_load(loaded_server, [0.0] * SLOTS)
    assert [c.status for c in warm] == [200] * (2 * SLOTS)
    service_s = statistics.median(c.done_at - c.sent for c in warm if c.done_at is not None)
    rate = OVERLOAD * SLOTS / service_s  # requests per second offered
    times = [i / rate for i in range(int(rate * LOAD_S))]

    calls = run_load(loaded_server, times)
    statuses = [c.status for c in calls]
    assert all(c.done_at is not None for c in calls), "a request was never answered"
    assert set(statuses) <= {200, 429, 503, 504}, statuses
    served, refused = [c for c in calls if c.status == 200], [c for c in calls if c.status == 429]
    assert len(refused) >= len(calls) / 2, statuses  # really overloaded
    assert len(served) >= SLOTS + QUEUE, statuses  # ... and still serving at full capacity

    latencies = sorted(c.head_at - c.sent for c in refused if c.head_at is not None)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    assert p99 < 0.1, f"p99 time to a 429: {p99 * 1000:.0f} ms"

    # Retry-After against the measured drain: for a refusal at t, the requests accepted before t
    # that had not got a slot yet took this long to get one.
    starts = [(c.sent, c.started()) for c in served]
    ratios = []
    for c in refused:
        assert c.head_at is not None
        waiting = [start for sent, start in starts if sent < c.sent and start > c.head_at]
        if waiting:
            drained = max(waiting) - c.head_at
            ratios.append(int(c.headers["retry-after"]) / max(drained, 0.5))
    assert len(ratios) >= len(refused) / 2
    # Integer seconds against a drain of a few, on a shared machine: the typical refusal is
    # within 2x, and none is off by more than 4x.
    assert 0.5 <= statistics.median(ratios) <= 2.0, sorted(ratios)
    assert all(0.25 <= r <= 4.0 for r in ratios), sorted(ratios)


def test_requests_after_the_load_are_served(loaded_server: ServerProcess) -> None:
    with httpx.Client(base_url=loaded_server.base_url, timeout=60, trust_env=False) as c:
        body = {"question": "q", "settings": {"temperature": 0.0, "max_tokens": 4}}
        assert c.post("/v1/query", json=body).status_code == 200
