"""API keys: fail-closed key sources, both key headers, every route walked, auth before the body."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from moondream_server.api import cli
from moondream_server.api.auth import is_public, presented_keys
from moondream_server.settings import KeySourceError, Settings
from tests.api.support import GREEDY, TINY, LiveServer, tiny_settings

KEY = "key-one"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MOONDREAM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LiveServer]:
    srv = LiveServer(tiny_settings(api_keys=f"{KEY}, key-two", api_key="single-key")).start()
    yield srv
    srv.stop()


# ------------------------------------------------------------------------- key sources


@pytest.mark.parametrize("value", [",", " , ,", "\t"])
def test_a_listed_source_without_keys_refuses(value: str) -> None:
    if not value.strip():
        # Blank counts as unset (compose files pass an empty MOONDREAM_API_KEYS through).
        assert Settings(api_keys=value).resolved_api_keys() == frozenset()
        return
    with pytest.raises(KeySourceError, match="holds no key"):
        Settings(api_keys=value).resolved_api_keys()


def test_a_key_file_of_comments_refuses(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# the ops team's keys\n\n   \n# (none yet)\n")
    with pytest.raises(KeySourceError, match="holds no key"):
        Settings(api_key_file=empty).resolved_api_keys()
    with pytest.raises(SystemExit) as caught:
        cli.main(["--api-key-file", str(empty)])
    assert "holds no key" in str(caught.value.code)
    for argv in (["--api-key", ","], ["--api-key", ""], ["--api-key", "  "]):
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert "refusing to start" in str(caught.value.code), argv


def test_the_singular_variable_of_the_official_client_is_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONDREAM_API_KEY", " one,whole key ")
    assert Settings().resolved_api_keys() == {"one,whole key"}
    monkeypatch.setenv("MOONDREAM_API_KEYS", "a,b")
    assert Settings().resolved_api_keys() == {"one,whole key", "a", "b"}


def test_the_real_process_refuses_to_start_on_an_empty_key_file(tmp_path: Path) -> None:
    exe = shutil.which("moondream-server", path=os.path.dirname(sys.executable))
    assert exe is not None, "the console script is not installed"
    empty = tmp_path / "keys"
    empty.write_text("# nothing\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOONDREAM_")}
    env["MOONDREAM_API_KEY_FILE"] = str(empty)
    done = subprocess.run(
        [exe, "--model", str(TINY), "--port", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert f"the API key file {empty} holds no key" in done.stderr
    assert "Uvicorn running" not in done.stderr + done.stdout


# ------------------------------------------------------------------------- headers


def test_presented_keys() -> None:
    assert presented_keys([(b"x-moondream-auth", b" k1 ")]) == ["k1"]
    assert presented_keys([(b"authorization", b"Bearer  k2")]) == ["k2"]
    assert presented_keys([(b"authorization", b"bearer k3")]) == ["k3"]
    assert presented_keys([(b"authorization", b"Basic azQ6")]) == []
    assert presented_keys([(b"authorization", b"Bearer ")]) == []


# ------------------------------------------------------------------------- every route


def _route_calls(srv: LiveServer) -> list[tuple[str, str]]:
    calls = []
    for route in iter_route_contexts(srv.app.routes):
        assert route.path is not None, route
        path = route.path.replace("{", "").replace("}", "")  # any value reaches the check
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                calls.append((method, path))
    return calls


def test_with_keys_no_unauthenticated_call_is_served(keyed_server: LiveServer) -> None:
    calls = _route_calls(keyed_server)
    protected = [(m, p) for m, p in calls if not is_public(p, public_metrics=False)]
    assert ("POST", "/v1/caption") in protected and ("GET", "/metrics") in protected
    assert len(protected) >= 12
    served = []
    with keyed_server.client() as c:
        for method, path in protected:
            for headers in (
                {},
                {"X-Moondream-Auth": "wrong"},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {KEY}"},
                {"X-Moondream-Auth": f"Bearer {KEY}"},
            ):
                r = c.request(method, path, headers=headers, content=b"{}")
                if r.status_code != 401:
                    served.append((method, path, headers, r.status_code))
                else:
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert "Invalid or missing API key" in r.text
        # Unknown routes fail closed as well.
        assert c.get("/no/such/route").status_code == 401
    assert served == []


def test_bearer_and_every_key_source_work_on_every_route(keyed_server: LiveServer) -> None:
    with keyed_server.client() as c:
        for method, path in _route_calls(keyed_server):
            for headers in (
                {"X-Moondream-Auth": KEY},
                {"Authorization": "Bearer key-two"},
                {"authorization": "bearer single-key"},
            ):
                r = c.request(method, path, headers=headers, json={})
                assert r.status_code != 401, (method, path, headers)
                # /v1/segment answers 501 by design: Moondream2 has no segmentation skill
                assert r.status_code < 500 or (path, r.status_code) == ("/v1/segment", 501), (
                    method,
                    path,
                    r.text,
                )
        body = {"question": "q", "settings": GREEDY}
        r = c.post("/v1/query", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and isinstance(r.json()["answer"], str)


def test_public_routes_stay_open(keyed_server: LiveServer) -> None:
    with keyed_server.client() as c:
        for path in (
            "/health",
            "/v1/health",
            "/health/ready",
            "/v1/health/ready",
            "/docs",
            "/redoc",
            "/openapi.json",
            "/docs/assets/swagger-ui.css",
            "/docs/assets/redoc.standalone.js",
        ):
            assert c.get(path).status_code == 200, path


def test_metrics_exposure_is_a_choice(start_server: Callable[..., LiveServer]) -> None:
    srv = start_server(tiny_settings(api_keys=KEY, public_metrics=True))
    with srv.client() as c:
        assert c.get("/metrics").status_code == 200
        assert c.post("/v1/query", json={"question": "q"}).status_code == 401


def test_auth_is_checked_before_the_body_is_read(keyed_server: LiveServer) -> None:
    """A request that announces a large body and sends none is refused at once: the server never
    waited for (or parsed) the body."""
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=10) as sock:
        head = (
            "POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000\r\n\r\n"
        )
        start = time.monotonic()
        sock.sendall(head.encode())
        reply = sock.recv(65536).decode("latin-1")
        assert time.monotonic() - start < 5
    assert reply.startswith("HTTP/1.1 401"), reply
    assert "connection: close" in reply.lower()


def test_a_server_without_keys_ignores_any_key_sent(server: LiveServer) -> None:
    """OpenAI-style clients always send a key, often a dummy one."""
    body = {"question": "q", "settings": GREEDY}
    with server.client() as c:
        for headers in ({"Authorization": "Bearer sk-dummy"}, {"X-Moondream-Auth": "x"}, {}):
            assert c.post("/v1/query", json=body, headers=headers).status_code == 200


def test_openapi_declares_both_schemes(keyed_server: LiveServer) -> None:
    spec = httpx.get(keyed_server.base_url + "/openapi.json", trust_env=False).json()
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
    assert any(s.get("scheme") == "bearer" for s in schemes.values())


def test_real_openai_and_ollama_clients_send_their_key(keyed_server: LiveServer) -> None:
    import ollama
    import openai

    messages: Any = [{"role": "user", "content": "Say hi."}]
    with httpx.Client(trust_env=False, timeout=60) as http:
        good = openai.OpenAI(
            base_url=f"{keyed_server.base_url}/v1", api_key=KEY, http_client=http, max_retries=0
        )
        out = good.chat.completions.create(model="moondream2", messages=messages, max_completion_tokens=4)
        assert isinstance(out.choices[0].message.content, str)
        bad = openai.OpenAI(
            base_url=f"{keyed_server.base_url}/v1", api_key="sk-dummy", http_client=http, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="moondream2", messages=messages, max_completion_tokens=4)
    keyed = ollama.Client(
        host=keyed_server.base_url, trust_env=False, headers={"Authorization": f"Bearer {KEY}"}
    )
    anonymous = ollama.Client(host=keyed_server.base_url, trust_env=False)
    try:
        assert keyed.generate(model="moondream", prompt="hi", options={"num_predict": 4}).response is not None
        with pytest.raises(ollama.ResponseError) as caught:
            anonymous.generate(model="moondream", prompt="hi")
        assert caught.value.status_code == 401
    finally:
        keyed._client.close()
        anonymous._client.close()


def test_a_server_without_keys_serves_the_openai_clients_dummy_key(server: LiveServer) -> None:
    import openai

    with httpx.Client(trust_env=False, timeout=60) as http:
        client = openai.OpenAI(
            base_url=f"{server.base_url}/v1", api_key="sk-dummy", http_client=http, max_retries=0
        )
        out = client.chat.completions.create(
            model="moondream2", messages=[{"role": "user", "content": "Say hi."}], max_completion_tokens=4
        )
        assert isinstance(out.choices[0].message.content, str)
