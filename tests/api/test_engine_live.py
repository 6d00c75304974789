"""End to end: ``engine=batched`` in the settings serves the HTTP API through the batching engine.

Concurrent HTTP requests (plain and streamed, four skills, two images) give what the model
called directly gives, and /health reports the batching engine's counters.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from moondream_server.engine.batched import BatchedEngine
from moondream_server.model import Moondream
from moondream_server.settings import Settings
from tests.api.support import TINY, LiveServer

GREEDY = {"temperature": 0.0, "max_tokens": 16}
IMAGES = [TINY / "images" / "img1.png", TINY / "images" / "img4.png"]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(
        engine="batched",
        model=str(TINY),
        revision=None,
        device="cpu",
        dtype="float32",
        max_batch_size=4,
        log_level="warning",
    )
    srv = LiveServer(settings).start()
    yield srv
    srv.stop()


def sse_text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.read()
    chunks = []
    for line in "".join(r.iter_text()).split("\n"):
        if line.startswith("data: "):
            event = json.loads(line[len("data: ") :])
            assert "error" not in event
            chunks.append(event["chunk"])
    return "".join(chunks)


def test_http_requests_are_served_by_the_batching_engine(server: LiveServer, tiny_model: Moondream) -> None:
    assert isinstance(server.engine, BatchedEngine)
    jobs: list[tuple[str, dict[str, Any], Any]] = []
    for path in IMAGES:
        im, url = rgb(path), data_url(path)
        jobs += [
            (
                "/v1/caption",
                {"image_url": url, "settings": GREEDY},
                tiny_model.caption(im, settings=GREEDY)["caption"],
            ),
            (
                "/v1/query",
                {"image_url": url, "question": "What is it?", "stream": True, "settings": GREEDY},
                tiny_model.query(im, "What is it?", settings=GREEDY)["answer"],
            ),
            (
                "/v1/detect",
                {"image_url": url, "object": "cat", "settings": {"max_objects": 3}},
                tiny_model.detect(im, "cat", settings={"max_objects": 3})["objects"],
            ),
            (
                "/v1/point",
                {"image_url": url, "object": "cat", "settings": {"max_objects": 3}},
                tiny_model.point(im, "cat", settings={"max_objects": 3})["points"],
            ),
        ]

    def call(job: tuple[str, dict[str, Any], Any]) -> Any:
        route, body, _ = job
        with server.client() as c:
            if body.get("stream"):
                with c.stream("POST", route, json=body) as r:
                    return sse_text(r)
            r = c.post(route, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            key = {"/v1/caption": "caption", "/v1/detect": "objects", "/v1/point": "points"}[route]
            return out[key]

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    for (route, _, want), res in zip(jobs, got, strict=True):
        if route == "/v1/detect":
            keys = ("x_min", "y_min", "x_max", "y_max")
            assert [tuple(o[k] for k in keys) for o in res] == [tuple(o[k] for k in keys) for o in want]
        elif route == "/v1/point":
            assert [(p["x"], p["y"]) for p in res] == [(p["x"], p["y"]) for p in want]
        else:
            assert res == want, route

    health = httpx.get(server.base_url + "/health", trust_env=False).json()
    assert health["engine"] == "batched"
    counters = health["requests"]
    assert counters["completed"] == 1 + len(jobs)  # the warm-up went through the scheduler too
    assert counters["images_encoded"] == len(IMAGES)  # each once, for its four requests (CPU warm-up: none)
