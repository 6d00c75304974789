"""SIGTERM on a real ``moondream-server`` process with streamed and non-streamed requests in flight
(Moondream SSE, the ``openai`` and ``ollama`` clients): each finishes within the grace period or is
cut with the documented event (or 503 if its answer had not started), readiness and new requests
get 503 while it drains, and the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import ollama
import openai
import pytest

from moondream_server.api.shutdown import Drain, DrainMiddleware
from moondream_server.model import MoondreamConfig
from moondream_server.model.random_weights import write_checkpoint
from tests.api.support import TINY, LiveServer, tiny_settings

GRACE_S = 5.0
# Tokens: well inside the grace / far beyond it, on the slow checkpoint below (measured, 2 cores
# AMD EPYC Zen 4: ~6 ms a step alone, ~15 ms with six sequences, so SHORT takes ~0.6 s and LONG
# at least ~12 s). The tiny checkpoint decodes 1900 tokens of four streams in ~6 s, which a cut
# 5 s after a late SIGTERM could miss: the long requests then end normally, not cut.
SHORT, LONG = 40, 1900


class Process:
    def __init__(self, model: Path, log: Path, *args: str) -> None:
        exe = shutil.which("moondream-server", path=os.path.dirname(sys.executable))
        assert exe is not None, "the console script is not installed"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("MOONDREAM_") and "proxy" not in k.lower()
        }
        self.log = log
        self._out = log.open("w")
        argv = [exe, "--model", str(model), "--device", "cpu", "--dtype", "float32", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*argv, "--log-level", "info", *args], env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.base + "/health/ready", trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a 1,024-wide text model (its 51,200-word head makes each step
    ~4x slower), and end-of-text unreachable: every generation runs to max_tokens."""
    raw = json.loads((TINY / "config.json").read_text())
    raw["text"].update(dim=1024, ff_dim=64, n_layers=1, n_heads=16, n_kv_heads=16)
    raw["region"].update(dim=1024)
    raw["vision"].update(proj_out_dim=1024)
    folder = tmp_path_factory.mktemp("slow")
    return write_checkpoint(folder, MoondreamConfig.from_dict(raw), TINY / "tokenizer.json", never_stop=True)


@pytest.fixture
def process(slow_checkpoint: Path, tmp_path: Path) -> Iterator[Process]:
    p = Process(slow_checkpoint, tmp_path / "server.log", "--shutdown-grace", str(GRACE_S))
    try:
        p.wait_ready()
        yield p
    finally:
        p.close()


def _body(tokens: int, stream: bool) -> dict[str, Any]:
    return {"question": "hi", "stream": stream, "settings": {"temperature": 0, "max_tokens": tokens}}


class Stream(threading.Thread):
    """A streamed query read event by event; ``first`` is set once its first chunk arrived."""

    def __init__(self, base: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.tokens = base, tokens
        self.first = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(trust_env=False, timeout=60) as c,
                c.stream("POST", self.base + "/v1/query", json=_body(self.tokens, True)) as r,
            ):
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                        self.first.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.first.set()


class Call(threading.Thread):
    def __init__(self, base: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.tokens = base, tokens
        self.response: httpx.Response | None = None

    def run(self) -> None:
        with httpx.Client(trust_env=False, timeout=60) as c:
            self.response = c.post(self.base + "/v1/query", json=_body(self.tokens, False))


class ClientStream(threading.Thread):
    """A long stream read by a real client library (``openai`` or ``ollama``)."""

    def __init__(self, kind: str, base: str) -> None:
        super().__init__(daemon=True)
        self.kind, self.base = kind, base
        self.first = threading.Event()
        self.pieces: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.kind == "openai":
                with httpx.Client(trust_env=False, timeout=60) as http:
                    client = openai.OpenAI(
                        base_url=self.base + "/v1", api_key="sk-dummy", http_client=http, max_retries=0
                    )
                    chunks = client.chat.completions.create(
                        model="moondream2",
                        messages=[{"role": "user", "content": "hi"}],
                        temperature=0,
                        max_completion_tokens=LONG,
                        stream=True,
                    )
                    for chunk in chunks:
                        if chunk.choices and chunk.choices[0].delta.content:
                            self.pieces.append(chunk.choices[0].delta.content)
                            self.first.set()
            else:
                local = ollama.Client(host=self.base, trust_env=False, timeout=60)
                try:
                    options = {"num_predict": LONG, "temperature": 0}
                    for part in local.generate(model="moondream", prompt="hi", options=options, stream=True):
                        if part.response:
                            self.pieces.append(part.response)
                            self.first.set()
                finally:
                    local._client.close()
        except BaseException as exc:
            self.error = exc
        finally:
            self.first.set()


def _active(base: str) -> int:
    return int(httpx.get(base + "/health", trust_env=False).json()["requests"].get("active", 0))


def test_sigterm_drains_cuts_and_exits_zero(process: Process) -> None:
    base = process.base
    short_stream, long_stream = Stream(base, SHORT), Stream(base, LONG)
    short_call, long_call = Call(base, SHORT), Call(base, LONG)
    oai, oll = ClientStream("openai", base), ClientStream("ollama", base)
    everyone: list[threading.Thread] = [long_stream, long_call, oai, oll, short_stream, short_call]
    for t in everyone:
        t.start()
    deadline = time.monotonic() + 30
    while _active(base) < len(everyone):  # all are being generated
        assert time.monotonic() < deadline, "the requests did not all start"
        time.sleep(0.02)
    for stream in (long_stream, short_stream, oai, oll):
        assert stream.first.wait(10)

    process.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    # Draining: readiness says so, new work is refused, the probes still answer.
    deadline = sent + 3
    while (ready := httpx.get(base + "/health/ready", trust_env=False)).status_code == 200:
        assert time.monotonic() < deadline, "readiness did not turn 503"
        time.sleep(0.02)
    assert ready.status_code == 503 and ready.json()["detail"] == "the server is shutting down"
    assert ready.headers["retry-after"]
    refused = httpx.post(base + "/v1/query", json=_body(SHORT, False), trust_env=False)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down" and int(refused.headers["retry-after"]) >= 1
    assert httpx.get(base + "/health", trust_env=False).json()["ready"] is False

    code = process.proc.wait(GRACE_S + 30)
    exited = time.monotonic() - sent
    for t in everyone:
        t.join(10)
    log = process.log.read_text()
    assert code == 0, log
    assert GRACE_S <= exited < GRACE_S + 15, exited
    assert "Application shutdown complete" in log

    # Finished within the grace: whole answers.
    assert short_call.response is not None and short_call.response.status_code == 200
    assert short_call.response.json()["metrics"]["output_tokens"] == SHORT
    assert short_stream.error is None and short_stream.status == 200
    assert short_stream.events[-1]["completed"] is True and "error" not in short_stream.events[-1]
    assert all(e["completed"] is False for e in short_stream.events[:-1])

    # Still running when the grace ran out: the stream's last event says it was cut...
    assert long_stream.error is None and long_stream.status == 200, long_stream.error
    last = long_stream.events[-1]
    assert last.get("finish_reason") == "shutdown", f"the long stream did not end with the cut event: {last}"
    assert last["completed"] is True
    assert last["error"]["type"] == "server_shutdown" and "cut off" in last["error"]["message"]
    assert last["request_id"]
    chunks = [e["chunk"] for e in long_stream.events[:-1]]
    assert len(chunks) >= 2 and all(e["completed"] is False for e in long_stream.events[:-1])
    # Real clients are told too: openai and ollama raise with the message.
    assert isinstance(oai.error, openai.APIError) and "cut off" in str(oai.error), oai.error
    assert isinstance(oll.error, ollama.ResponseError) and "cut off" in str(oll.error), oll.error
    assert oai.pieces and oll.pieces
    # ... and the call whose answer had not started gets 503.
    assert long_call.response is not None and long_call.response.status_code == 503
    assert long_call.response.json()["error"]["code"] == "shutting_down"
    assert long_call.response.headers["retry-after"]


def test_an_idle_server_stops_without_waiting_for_the_grace(start_server: Callable[..., LiveServer]) -> None:
    """In process (the signal handler called directly, as the signal would): nothing in flight, so
    the drain ends at once and uvicorn stops, long before the grace period."""
    srv = start_server(tiny_settings(shutdown_grace_s=30))
    start = time.monotonic()
    srv._server.handle_exit(signal.SIGTERM, None)
    srv._thread.join(20)
    assert not srv._thread.is_alive() and time.monotonic() - start < 10
    assert srv.app.state.drain.draining


# -- the cut against an app that does not stop when cancelled (in process, ordering forced) ----

CHUNK = b'data: {"chunk": "a", "completed": false}\n\n'
APP_FINAL = b'data: {"chunk": "", "completed": true, "error": {"message": "not ready"}}\n\n'
AppEnd = Literal["own-final-event", "bare-end", "never"]


def _cut_stream(app_end: AppEnd) -> tuple[list[dict[str, Any]], bool]:
    """A started SSE answer cut by ``Drain.run``, from an app that swallows the cut's cancellation
    and then ends the stream its own way ("own-final-event": an in-band error event, as a stream
    reports the engine stopping under it; "bare-end": the end of the body only, as sse-starlette
    ends streams when the server exits) or never ends it (uvicorn's forced exit then cancels the
    request). Returns the ASGI messages that reached the server, and whether the request task
    ended by cancellation."""

    async def main() -> tuple[list[dict[str, Any]], bool]:
        drain = Drain()
        sent: list[dict[str, Any]] = []
        streaming = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-request-id", b"rid-7")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            streaming.set()
            with contextlib.suppress(asyncio.CancelledError):  # the cut's cancellation, lost on purpose
                await asyncio.sleep(60)
            if app_end == "never":
                await asyncio.sleep(60)
            if app_end == "own-final-event":
                await send({"type": "http.response.body", "body": APP_FINAL, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/v1/query", "method": "POST", "headers": []}
        request = asyncio.create_task(DrainMiddleware(app, drain)(scope, receive, send))
        await streaming.wait()
        await drain.run(grace_s=0.01, cut_wait_s=0.2)
        if app_end == "never":
            request.cancel()  # what uvicorn does once its own graceful timeout has passed
        try:
            await asyncio.wait_for(request, 5)
        except asyncio.CancelledError:
            return sent, True
        return sent, False

    return asyncio.run(main())


@pytest.mark.parametrize("app_end", ["own-final-event", "bare-end", "never"])
def test_a_cut_stream_ends_with_the_cut_event_whatever_the_app_sends_after(app_end: AppEnd) -> None:
    sent, cancelled = _cut_stream(app_end)
    assert cancelled is (app_end == "never")
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert bodies[0]["body"] == CHUNK
    # Exactly one end of the body, and it is the cut event: nothing the app sent after the cut
    # (its own last event, its own end of stream) reached the client.
    assert [m.get("more_body", False) for m in bodies] == [True, False], bodies
    assert APP_FINAL not in [m["body"] for m in bodies]
    raw = bodies[-1]["body"]
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    event = json.loads(raw[6:])
    assert event["completed"] is True and event["finish_reason"] == "shutdown"
    assert event["error"]["type"] == "server_shutdown" and event["request_id"] == "rid-7"
