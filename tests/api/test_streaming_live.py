"""SSE streaming of caption/query on both families: framing, equality with the non-streamed
answer, incremental delivery, and cancellation when the client goes away."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from moondream_server.model import Moondream, load
from tests.api.support import GREEDY, IMAGES, LiveServer, encoded, file_data_url, open_rgb, tiny_settings

IMG1, IMG2, IMG3, IMG4, _ = IMAGES
QUESTION = "What is in this image?"


def read_events(r: httpx.Response) -> list[dict[str, Any]]:
    """Parse an SSE body the way the official client does, checking the framing on the way."""
    assert r.status_code == 200, r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in r.headers
    events: list[dict[str, Any]] = []
    raw = "".join(r.iter_text())
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]  # pings are comments
        if not lines:
            continue
        assert len(lines) == 1, block
        assert lines[0].startswith("data: "), block
        payload = lines[0][len("data: ") :]
        assert payload != "[DONE]"
        events.append(json.loads(payload))
    return events


def check_stream(events: list[dict[str, Any]]) -> str:
    assert events, "no events"
    *chunks, final = events
    for ev in chunks:
        assert ev["completed"] is False
        assert isinstance(ev["chunk"], str) and ev["chunk"]
    assert final["completed"] is True
    assert final["chunk"] == ""
    assert isinstance(final["request_id"], str) and final["request_id"]
    assert "error" not in final
    return "".join(ev["chunk"] for ev in chunks)


def stream_post(client: httpx.Client, path: str, **kwargs: Any) -> list[dict[str, Any]]:
    with client.stream("POST", path, **kwargs) as r:
        return read_events(r)


# ------------------------------------------------------------------------------ equality + framing


@pytest.mark.parametrize("path", [IMG1, IMG2, IMG4], ids=lambda p: p.stem)
def test_v1_caption_stream_joins_to_the_answer(
    client: httpx.Client, tiny_model: Moondream, path: Path
) -> None:
    settings = {"temperature": 0.0, "max_tokens": 40}
    body = {"image_url": file_data_url(path), "length": "long", "stream": True, "settings": settings}
    text = check_stream(stream_post(client, "/v1/caption", json=body))
    assert text == tiny_model.caption(encoded(tiny_model, path), length="long", settings=settings)["caption"]


def test_v1_query_stream_joins_to_the_answer(client: httpx.Client, tiny_model: Moondream) -> None:
    body = {"image_url": file_data_url(IMG2), "question": QUESTION, "stream": True, "settings": GREEDY}
    text = check_stream(stream_post(client, "/v1/query", json=body))
    assert text == tiny_model.query(encoded(tiny_model, IMG2), QUESTION, settings=GREEDY)["answer"]


def test_v1_query_stream_text_only(client: httpx.Client, tiny_model: Moondream) -> None:
    body = {"question": QUESTION, "stream": True, "settings": GREEDY}
    text = check_stream(stream_post(client, "/v1/query", json=body))
    assert text == tiny_model.query(None, QUESTION, settings=GREEDY)["answer"]


def test_v1_query_stream_with_reasoning_sends_the_answer(client: httpx.Client, tiny_model: Moondream) -> None:
    body = {"image_url": file_data_url(IMG2), "question": QUESTION, "stream": True, "reasoning": True}
    body["settings"] = GREEDY
    text = check_stream(stream_post(client, "/v1/query", json=body))
    assert (
        text
        == tiny_model.query(encoded(tiny_model, IMG2), QUESTION, reasoning=True, settings=GREEDY)["answer"]
    )


def test_seed_streams(client: httpx.Client, tiny_model: Moondream) -> None:
    settings = {"temperature": 0.0, "max_tokens": 40}
    body = {"image": file_data_url(IMG1), "length": "short", "stream": True, "settings": settings}
    text = check_stream(stream_post(client, "/caption", json=body))
    assert text == tiny_model.caption(encoded(tiny_model, IMG1), length="short", settings=settings)["caption"]

    body = {"image": file_data_url(IMG3), "question": QUESTION, "stream": True, "settings": GREEDY}
    text = check_stream(stream_post(client, "/query", json=body))
    assert text == tiny_model.query(encoded(tiny_model, IMG3), QUESTION, settings=GREEDY)["answer"]

    files = {"file": ("a.png", IMG1.read_bytes(), "image/png")}
    data = {"stream": "true", "settings": json.dumps(settings)}
    text = check_stream(stream_post(client, "/upload/caption", files=files, data=data))
    assert text == tiny_model.caption(encoded(tiny_model, IMG1), settings=settings)["caption"]

    data = {"stream": "true", "question": QUESTION, "settings": json.dumps(GREEDY)}
    text = check_stream(stream_post(client, "/upload/query", files=files, data=data))
    assert text == tiny_model.query(encoded(tiny_model, IMG1), QUESTION, settings=GREEDY)["answer"]


def test_errors_before_the_stream_are_real_statuses(client: httpx.Client) -> None:
    with client.stream("POST", "/v1/caption", json={"image_url": "@@@", "stream": True}) as r:
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/json")
        assert "error" in json.loads(r.read())
    with client.stream("POST", "/query", json={"image": "@@@", "question": "q", "stream": True}) as r:
        assert r.status_code == 400
        assert "detail" in json.loads(r.read())


# ------------------------------------------------------------------------------ long generations


@pytest.fixture(scope="module")
def long_server(never_stop_checkpoint: Path) -> Iterator[LiveServer]:
    """Serves a checkpoint that never emits end-of-text, so every generation runs to max_tokens."""
    srv = LiveServer(tiny_settings(model=str(never_stop_checkpoint))).start()
    yield srv
    srv.stop()


def counters(srv: LiveServer) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(srv.base_url + "/health", trust_env=False).json()["requests"]
    return stats


def test_long_stream_equals_non_streamed(long_server: LiveServer, never_stop_checkpoint: Path) -> None:
    model = load(str(never_stop_checkpoint), device="cpu", dtype=torch.float32)
    settings = {"temperature": 0.0, "max_tokens": 60}
    want = model.caption(open_rgb(IMG1), settings=settings)["caption"]
    with long_server.client() as c:
        body = {"image_url": file_data_url(IMG1), "stream": True, "settings": settings}
        events = stream_post(c, "/v1/caption", json=body)
        plain = c.post("/v1/caption", json={**body, "stream": False}).json()
    assert len(events) > 3  # really delivered in pieces
    assert check_stream(events) == want == plain["caption"]
    assert plain["finish_reason"] == "length"
    metrics = plain["metrics"]
    assert metrics["output_tokens"] == 60
    assert metrics["input_tokens"] > 0
    assert metrics["ttft_ms"] > 0 and metrics["decode_time_ms"] > 0


def test_first_chunk_arrives_while_still_generating(long_server: LiveServer) -> None:
    body = {
        "image_url": file_data_url(IMG1),
        "stream": True,
        "settings": {"temperature": 0.0, "max_tokens": 600},
    }
    before = counters(long_server)
    with long_server.client() as c, c.stream("POST", "/v1/caption", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["completed"] is False
        t_first = time.monotonic()
        during = counters(long_server)  # generation of 600 tokens is still going on
        rest = [line for line in lines if line.startswith("data: ")]
        t_last = time.monotonic()
    after = counters(long_server)
    assert during["completed"] == before["completed"], "the first chunk came only after generation finished"
    assert after["completed"] == before["completed"] + 1
    assert json.loads(rest[-1][6:])["completed"] is True
    assert len(rest) > 10
    assert t_last - t_first > 0.05


def test_client_disconnect_stops_generation(long_server: LiveServer) -> None:
    # caption of img1: its never-stop text has regular spaces, so pieces (and checks) are frequent
    body = {
        "image_url": file_data_url(IMG1),
        "stream": True,
        "settings": {"temperature": 0.0, "max_tokens": 1300},
    }
    before = counters(long_server)
    with long_server.client() as c, c.stream("POST", "/v1/caption", json=body) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    # The connection is closed now; the worker must notice and stop.
    deadline = time.monotonic() + 20
    while counters(long_server)["interrupted"] == before["interrupted"]:
        assert time.monotonic() < deadline, "generation was not stopped after the client left"
        time.sleep(0.05)
    after = counters(long_server)
    assert after["completed"] == before["completed"]
    # And the model is free again at once.
    with long_server.client() as c:
        r = c.post("/v1/query", json={"question": "hi", "settings": {"temperature": 0.0, "max_tokens": 3}})
        assert r.status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {
                "model": "moondream2",
                "stream": True,
                "temperature": 0,
                "max_tokens": 1200,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Describe it."},
                            {"type": "image_url", "image_url": {"url": file_data_url(IMG1)}},
                        ],
                    }
                ],
            },
        ),
        (
            "/api/generate",
            {
                "model": "moondream2",
                "prompt": "Describe it.",
                "images": [file_data_url(IMG1).split(",", 1)[1]],
                "options": {"temperature": 0, "num_predict": 1200},
            },
        ),
    ],
    ids=["openai", "ollama"],
)
def test_client_disconnect_stops_generation_on_every_surface(
    long_server: LiveServer, path: str, body: dict[str, Any]
) -> None:
    before = counters(long_server)
    with long_server.client() as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.strip())
    deadline = time.monotonic() + 20
    while counters(long_server)["interrupted"] == before["interrupted"]:
        assert time.monotonic() < deadline, "generation was not stopped after the client left"
        time.sleep(0.05)
    assert counters(long_server)["completed"] == before["completed"]
