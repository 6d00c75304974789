"""The same HTTP layer over the batching engine (engine=batched): answers equal the model called
directly, concurrent requests included, and streams work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from moondream_server.model import Moondream
from tests.api.support import GREEDY, IMAGES, LiveServer, file_data_url, open_rgb, tiny_settings

QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def batched_server() -> Iterator[LiveServer]:
    srv = LiveServer(tiny_settings(engine="batched", max_batch_size=4)).start()
    yield srv
    srv.stop()


def test_health_names_the_engine(batched_server: LiveServer) -> None:
    body = httpx.get(batched_server.base_url + "/health", trust_env=False).json()
    assert body["engine"] == "batched" and body["ready"] is True
    # what the loader chose for float32 on a CPU: float16 weight storage through fbgemm
    assert body["dtype"] == "float32" and "fbgemm fp16" in body["precision"]


def test_concurrent_requests_match_the_model(batched_server: LiveServer, tiny_model: Moondream) -> None:
    def ask(path_index: int) -> tuple[int, str, str]:
        path = IMAGES[path_index]
        with batched_server.client() as c:
            cap = c.post("/v1/caption", json={"image_url": file_data_url(path), "settings": GREEDY})
            qry = c.post(
                "/query", json={"image": file_data_url(path), "question": QUESTION, "settings": GREEDY}
            )
        assert cap.status_code == 200 and qry.status_code == 200
        return path_index, cap.json()["caption"], qry.json()["answer"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(4)))
    for i, caption, answer in results:
        img = open_rgb(IMAGES[i])
        assert caption == tiny_model.caption(img, settings=GREEDY)["caption"]
        assert answer == tiny_model.query(img, QUESTION, settings=GREEDY)["answer"]


def test_detect_point_and_stream(batched_server: LiveServer, tiny_model: Moondream) -> None:
    img = open_rgb(IMAGES[1])
    url = file_data_url(IMAGES[1])
    with batched_server.client() as c:
        objs = c.post(
            "/v1/detect", json={"image_url": url, "object": "cat", "settings": {"max_objects": 4}}
        ).json()
        assert objs["objects"] == tiny_model.detect(img, "cat", settings={"max_objects": 4})["objects"]
        points = c.post("/v1/point", json={"image_url": url, "object": "cat"}).json()
        assert points["points"] == tiny_model.point(img, "cat")["points"]
        body = {"image_url": url, "question": QUESTION, "stream": True, "settings": GREEDY}
        with c.stream("POST", "/v1/query", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["completed"] is True
    joined = "".join(e["chunk"] for e in events[:-1])
    assert joined == tiny_model.query(img, QUESTION, settings=GREEDY)["answer"]
