"""/metrics on the live server: Prometheus text whose numbers move with the traffic."""

from __future__ import annotations

import httpx

from tests.api.support import GREEDY, IMAGES, LiveServer, file_data_url


def _values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split(" ")
            out[name] = float(value)
    return out


def test_metrics_report_readiness_queue_and_counters(server: LiveServer, client: httpx.Client) -> None:
    before = client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    first = _values(before.text)
    assert first["moondream_ready"] == 1
    assert first["moondream_queue_depth"] == 0
    body = {"image_url": file_data_url(IMAGES[0]), "length": "short", "settings": GREEDY}
    assert client.post("/v1/caption", json=body).status_code == 200
    second = _values(client.get("/metrics").text)
    assert second["moondream_engine_completed"] == first["moondream_engine_completed"] + 1
    # Every sample has HELP and TYPE lines, as Prometheus parsers expect.
    text = client.get("/metrics").text
    for name in second:
        assert f"# TYPE {name} gauge" in text and f"# HELP {name} " in text
