"""/metrics on a live server: prometheus-client's own parser (and ``promtool check metrics`` where
Debian's ``prometheus`` package is installed) accept it, and its numbers move with the traffic."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.api.support import GREEDY, LiveServer, data_url, encode, tiny_settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: httpx.Client) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type, parsed by the client library."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        assert family.documentation, family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_families_follow_prometheus_conventions(client: httpx.Client) -> None:
    client.get("/health")
    _, types = scrape(client)
    expected = {
        "moondream_http_requests": "counter",
        "moondream_http_request_duration_seconds": "histogram",
        "moondream_time_to_first_token_seconds": "histogram",
        "moondream_queue_wait_seconds": "histogram",
        "moondream_request_input_tokens": "histogram",
        "moondream_request_output_tokens": "histogram",
        "moondream_ready": "gauge",
        "moondream_queue_depth": "gauge",
        "moondream_active_sequences": "gauge",
        "moondream_engine_requests": "counter",
        "moondream_image_cache_bytes": "gauge",
        "moondream_image_cache_entries": "gauge",
        "moondream_image_cache_hits": "counter",
        "moondream_image_cache_misses": "counter",
        "moondream_model_load_seconds": "gauge",
        "moondream_model_info": "gauge",
    }
    assert {k: types.get(k) for k in expected} == expected


def test_numbers_move_with_the_traffic(server: LiveServer, client: httpx.Client) -> None:
    before, _ = scrape(client)
    assert value(before, "moondream_ready") == 1
    assert value(before, "moondream_queue_depth") == 0
    assert value(before, "moondream_active_sequences") == 0
    assert value(before, "moondream_model_load_seconds") > 0

    # An image no other test sent: its first caption misses the image cache, the second hits.
    noise = Image.frombytes(
        "RGB", (64, 48), bytes(random.Random(13).randrange(256) for _ in range(64 * 48 * 3))
    )
    body = {"image_url": data_url(encode(noise)), "length": "short", "settings": GREEDY}
    first = client.post("/v1/caption", json=body).json()
    second = client.post("/v1/caption", json=body).json()  # the same image: from the cache
    assert client.post("/v1/caption", json={}).status_code == 422
    assert client.get("/no/such/route").status_code == 404
    question = {"question": "What is this?", "settings": GREEDY}
    plain = client.post("/v1/query", json=question).json()
    with client.stream("POST", "/v1/query", json={**question, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["completed"] is True

    after, _ = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    caption = {"route": "/v1/caption", "method": "POST"}
    assert delta("moondream_http_requests_total", **caption, status="200") == 2
    assert delta("moondream_http_requests_total", **caption, status="422") == 1
    assert delta("moondream_http_requests_total", route="other", method="GET", status="404") == 1
    assert delta("moondream_http_request_duration_seconds_count", **caption) == 3
    assert delta("moondream_http_request_duration_seconds_sum", **caption) > 0
    query = {"route": "/v1/query", "method": "POST"}
    assert delta("moondream_http_requests_total", **query, status="200") == 2

    out = first["metrics"]["output_tokens"] + second["metrics"]["output_tokens"]
    assert delta("moondream_request_output_tokens_count", task="caption") == 2
    assert delta("moondream_request_output_tokens_sum", task="caption") == out
    assert delta("moondream_time_to_first_token_seconds_count", task="caption") == 2
    ttft = (first["metrics"]["ttft_ms"] + second["metrics"]["ttft_ms"]) / 1000
    assert delta("moondream_time_to_first_token_seconds_sum", task="caption") == pytest.approx(ttft)
    # The streamed greedy answer is the plain one: the same number of tokens, counted once more.
    assert delta("moondream_request_output_tokens_count", task="query") == 2
    assert delta("moondream_request_output_tokens_sum", task="query") == 2 * plain["metrics"]["output_tokens"]

    assert delta("moondream_engine_requests_total", outcome="completed") == 4
    assert delta("moondream_image_cache_misses_total") == 1
    assert delta("moondream_image_cache_hits_total") == 1
    assert delta("moondream_queue_wait_seconds_count", task="caption") == 2
    assert value(after, "moondream_image_cache_bytes") > 0
    assert value(after, "moondream_image_cache_entries") >= 1
    info = [k for k in after if k[0] == "moondream_model_info"]
    assert len(info) == 1 and dict(info[0][1])["device"] == "cpu"


def test_openmetrics_on_request(client: httpx.Client) -> None:
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")


def test_promtool_accepts_the_exposition(client: httpx.Client) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); the parser test ran")
    client.post("/v1/query", json={"question": "hi", "settings": GREEDY})
    text = client.get("/metrics").text
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done


def test_queue_wait_is_the_time_spent_behind_another_request(
    start_server: Callable[..., LiveServer], never_stop_checkpoint: Path
) -> None:
    """One slot, two requests of the same length sent together: one waits about as long as the
    other runs, and that is what the queue-wait histogram says."""
    srv = start_server(tiny_settings(model=str(never_stop_checkpoint), max_batch_size=1))
    body = {"question": "hi", "settings": {"temperature": 0, "max_tokens": 300}}
    took: list[float] = []

    def call() -> None:
        with srv.client() as c:
            start = time.monotonic()
            assert c.post("/v1/query", json=body).status_code == 200
            took.append(time.monotonic() - start)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with srv.client() as c:
        samples, _ = scrape(c)
    waited = value(samples, "moondream_queue_wait_seconds_sum", task="query")
    assert value(samples, "moondream_queue_wait_seconds_count", task="query") == 2
    # The second waited for the first's whole run (the quicker client's time), and never longer
    # than its own client waited in all.
    assert 0.5 * min(took) < waited < max(took), (waited, took)
