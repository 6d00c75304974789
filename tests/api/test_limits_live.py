"""Admission and lifecycle on live servers: 429 queue full, 504 deadline, 503 before ready or
after a failed load, and API keys (401)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moondream_server.engine.batched import BatchedEngine
from moondream_server.engine.loader import model_loader
from moondream_server.engine.types import EngineInfo
from moondream_server.model import Moondream
from moondream_server.settings import Settings
from tests.api.support import GREEDY, IMAGES, LiveServer, file_data_url, tiny_settings

IMG1 = IMAGES[0]
# Long generations use caption on img1: with the never-stop checkpoint its text has a space every
# few tokens, so pieces (and the worker's cancellation checks between them) come regularly.
# (Some prompts produce runs of >1000 characters without a space, which the detokeniser holds
# back as one piece; cancellation would then wait for that piece.)
StartServer = Callable[..., LiveServer]


def v1_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def seed_error(r: httpx.Response, status: int) -> Any:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"detail"}
    return r.json()["detail"]


def counters(srv: LiveServer) -> dict[str, Any]:
    return httpx.get(srv.base_url + "/health", trust_env=False).json()  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def engine_for(settings: Settings, loader: Callable[[], Moondream]) -> BatchedEngine[Any, Any, Any]:
    info = EngineInfo(settings.model, settings.revision, settings.device, settings.dtype)
    return BatchedEngine(
        loader, info=info, max_queue=settings.max_queue, request_timeout_s=settings.request_timeout_s
    )


# ------------------------------------------------------------------------------ 429


def test_queue_full_is_429_with_retry_after(start_server: StartServer, never_stop_checkpoint: Path) -> None:
    # One running request and one waiting fill the server when one request runs at a time.
    srv = start_server(tiny_settings(model=str(never_stop_checkpoint), max_queue=1, max_batch_size=1))
    long_body = {
        "image_url": file_data_url(IMG1),
        "stream": True,
        "settings": {"temperature": 0.0, "max_tokens": 1300},
    }
    short = {"question": "hi", "settings": {"temperature": 0.0, "max_tokens": 2}}
    results: list[int] = []
    with srv.client() as c, c.stream("POST", "/v1/caption", json=long_body) as running:
        # 1. the long request is on the worker (its first chunk is out) ...
        assert running.status_code == 200
        lines = running.iter_lines()  # keep a reference: a collected iterator closes the connection
        assert next(lines).startswith("data: ")

        # 2. ... one more fills the queue of one ...
        def wait_in_queue() -> None:
            with srv.client() as wc:
                results.append(wc.post("/v1/query", json=short).status_code)

        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        wait_for(lambda: counters(srv)["queue_depth"] == 1)
        # 3. ... so the next ones are refused at once, on both families, streamed or not.
        err = v1_error(c.post("/v1/query", json=short), 429)
        assert err["type"] == "rate_limit_error"
        r = c.post("/v1/caption", json={"image_url": file_data_url(IMG1), "stream": True})
        v1_error(r, 429)
        assert int(r.headers["Retry-After"]) >= 1
        # Refused before the image is even decoded: a broken image gets 429 too, not 400.
        v1_error(c.post("/v1/detect", json={"image_url": "@@@", "object": "cat"}), 429)
        r = c.post("/detect", json={"image": file_data_url(IMG1), "object": "cat"})
        assert "queue" in seed_error(r, 429)
        assert int(r.headers["Retry-After"]) >= 1
    # Closing the long stream frees the worker; the queued request is then served.
    waiter.join(30)
    assert results == [200]


# ------------------------------------------------------------------------------ 504


def test_deadline_is_504_and_stops_the_work(start_server: StartServer, never_stop_checkpoint: Path) -> None:
    srv = start_server(tiny_settings(model=str(never_stop_checkpoint), request_timeout_s=1.5))
    before = counters(srv)["requests"]
    with srv.client() as c:
        # Runs to its token budget (end-of-text is unreachable): far longer than 1.5 s.
        t0 = time.monotonic()
        long = {"temperature": 0.0, "max_tokens": 1300}
        r = c.post("/v1/caption", json={"image_url": file_data_url(IMG1), "settings": long})
        err = v1_error(r, 504)
        assert err["type"] == "timeout_error"
        assert time.monotonic() - t0 < 10
        seed_error(c.post("/caption", json={"image": file_data_url(IMG1), "settings": long}), 504)
        # The worker stopped both generations instead of running them to the end.
        wait_for(lambda: counters(srv)["requests"]["interrupted"] >= before["interrupted"] + 2)
        assert counters(srv)["requests"]["completed"] == before["completed"]
        # Short requests still fit the deadline.
        r = c.post("/v1/query", json={"question": "q", "settings": {"max_tokens": 3}})
        assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ 503


def test_not_ready_is_503_until_loaded_and_warm(start_server: StartServer) -> None:
    settings = tiny_settings()
    gate = threading.Event()

    def gated_loader() -> Moondream:
        assert gate.wait(60)
        return model_loader(settings)

    srv = start_server(settings, engine_for(settings, gated_loader), wait_ready=False)
    with srv.client() as c:
        health = c.get("/health")
        assert health.status_code == 200
        assert health.json()["ready"] is False and health.json()["model_loaded"] is False
        r = c.get("/health/ready")
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        r = c.post("/v1/caption", json={"image_url": file_data_url(IMG1), "settings": GREEDY})
        assert v1_error(r, 503)["type"] == "service_unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        r = c.post("/v1/query", json={"question": "q", "stream": True})
        v1_error(r, 503)
        seed_error(c.post("/point", json={"image": file_data_url(IMG1), "object": "cat"}), 503)
        seed_error(
            c.post("/upload/point", files={"file": ("a.png", IMG1.read_bytes())}, data={"object": "x"}), 503
        )

        gate.set()
        srv.wait_ready(30)
        assert c.get("/health").json()["model_loaded"] is True
        r = c.post("/v1/caption", json={"image_url": file_data_url(IMG1), "settings": GREEDY})
        assert r.status_code == 200, r.text


def test_failed_load_is_reported_and_503(start_server: StartServer, tmp_path: Path) -> None:
    settings = tiny_settings(model=str(tmp_path / "no-such-checkpoint"))
    srv = start_server(settings, wait_ready=False)
    with srv.client() as c:
        wait_for(lambda: c.get("/health").json().get("error") is not None)
        assert c.get("/health/ready").status_code == 503
        err = v1_error(c.post("/v1/query", json={"question": "q"}), 503)
        assert "failed to load" in err["message"]


# ------------------------------------------------------------------------------ 401


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# ops keys\nkey-from-file\n\n")
    srv = LiveServer(tiny_settings(api_keys="key-one, key-two", api_key_file=key_file)).start()
    yield srv
    srv.stop()


FEW = {"max_objects": 4}
INFERENCE_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/caption", {"json": {"image_url": file_data_url(IMG1), "settings": GREEDY}}),
    ("/v1/query", {"json": {"question": "q", "settings": GREEDY}}),
    ("/v1/detect", {"json": {"image_url": file_data_url(IMG1), "object": "cat", "settings": FEW}}),
    ("/v1/point", {"json": {"image_url": file_data_url(IMG1), "object": "cat", "settings": FEW}}),
    ("/caption", {"json": {"image": file_data_url(IMG1), "settings": GREEDY}}),
    ("/query", {"json": {"image": file_data_url(IMG1), "question": "q", "settings": GREEDY}}),
    ("/detect", {"json": {"image": file_data_url(IMG1), "object": "cat", "settings": FEW}}),
    ("/point", {"json": {"image": file_data_url(IMG1), "object": "cat", "settings": FEW}}),
    ("/upload/caption", {"files": {"file": ("a.png", IMG1.read_bytes())}}),
    ("/upload/query", {"files": {"file": ("a.png", IMG1.read_bytes())}, "data": {"question": "q"}}),
    ("/upload/detect", {"files": {"file": ("a.png", IMG1.read_bytes())}, "data": {"object": "cat"}}),
    (
        "/upload/point",
        {
            "files": {"file": ("a.png", IMG1.read_bytes())},
            "data": {"object": "cat", "settings": '{"max_objects": 4}'},
        },
    ),
]


def test_keys_required_on_every_inference_route(keyed_server: LiveServer) -> None:
    with keyed_server.client() as c:
        for path, kwargs in INFERENCE_CALLS:
            for headers in ({}, {"X-Moondream-Auth": "wrong"}, {"X-Moondream-Auth": ""}):
                r = c.post(path, headers=headers, **kwargs)
                if path.startswith("/v1"):
                    err = v1_error(r, 401)
                    assert err["type"] == "authentication_error"
                else:
                    seed_error(r, 401)
            r = c.post(path, headers={"X-Moondream-Auth": "key-two"}, **kwargs)
            assert r.status_code == 200, (path, r.text)


def test_every_configured_key_works(keyed_server: LiveServer) -> None:
    body = {"question": "q", "settings": GREEDY}
    with keyed_server.client() as c:
        for key in ("key-one", "key-two", "key-from-file"):
            assert c.post("/v1/query", json=body, headers={"X-Moondream-Auth": key}).status_code == 200
        for key in ("key-one,key-two", "KEY-ONE", "Bearer key-one", "# ops keys"):
            assert c.post("/v1/query", json=body, headers={"X-Moondream-Auth": key}).status_code == 401


def test_auth_comes_before_validation_and_health_stays_open(keyed_server: LiveServer) -> None:
    with keyed_server.client() as c:
        assert c.post("/v1/caption", json={}).status_code == 401
        assert c.post("/v1/caption", json={}, headers={"X-Moondream-Auth": "key-one"}).status_code == 422
        for path in ("/health", "/v1/health", "/health/ready", "/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 200, path


def test_no_keys_means_open(client: httpx.Client) -> None:
    r = client.post(
        "/v1/query", json={"question": "q", "settings": GREEDY}, headers={"X-Moondream-Auth": "anything"}
    )
    assert r.status_code == 200
    assert client.post("/v1/query", json={"question": "q", "settings": GREEDY}).status_code == 200
