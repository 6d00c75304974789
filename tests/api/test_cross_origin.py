"""Cross-origin browser requests, CORS origins and allowed hosts, on live servers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from moondream_server.api.cross_origin import same_origin
from tests.api.support import GREEDY, IMAGES, LiveServer, tiny_settings

UPLOAD = {"files": {"file": ("a.png", IMAGES[0].read_bytes())}, "data": {"object": "cat"}}
QUERY = {"question": "q", "settings": GREEDY}


@pytest.mark.parametrize(
    ("origin", "host", "expected"),
    [
        ("http://127.0.0.1:8001", "127.0.0.1:8001", True),
        ("http://LOCALHOST:8001", "localhost:8001", True),
        ("http://example.com", "example.com:80", True),
        ("https://example.com", "example.com", True),  # TLS proxy in front, plain hop to us
        ("https://example.com", "example.com:443", True),
        ("http://127.0.0.1:8002", "127.0.0.1:8001", False),
        ("http://evil.example", "127.0.0.1:8001", False),
        ("http://127.0.0.1.evil.example:8001", "127.0.0.1:8001", False),
        ("null", "127.0.0.1:8001", False),
        ("", "127.0.0.1:8001", False),
        ("http://[::1]:8001", "[::1]:8001", True),
        ("http://x:notaport", "x:8001", False),
    ],
)
def test_same_origin(origin: str, host: str, expected: bool) -> None:
    assert same_origin(origin, host, "http") is expected


def test_a_server_without_configuration_refuses_cross_origin_browsers(server: LiveServer) -> None:
    with server.client() as c:
        before = c.get("/health").json()["requests"]
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}"):
            # The "simple" multipart POST a hostile page can send without a preflight.
            r = c.post("/upload/detect", headers={"Origin": origin}, **UPLOAD)  # type: ignore[arg-type]
            assert r.status_code == 403, r.text
            assert "cross-origin request" in r.json()["detail"]
            assert "access-control-allow-origin" not in r.headers
            r = c.post("/v1/query", json=QUERY, headers={"Origin": origin})
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
            r = c.options("/v1/query", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 403
        # Nothing reached the engine.
        assert c.get("/health").json()["requests"] == before
        # Same-origin pages (the playground) and clients that send no Origin are served.
        same = {"Origin": server.base_url}
        assert c.post("/upload/detect", headers=same, **UPLOAD).status_code == 200  # type: ignore[arg-type]
        assert c.post("/v1/query", json=QUERY, headers=same).status_code == 200
        assert c.post("/v1/query", json=QUERY).status_code == 200


def test_configured_origins_get_cors(start_server: Callable[..., LiveServer]) -> None:
    app_origin = "http://app.example:3000"
    srv = start_server(tiny_settings(cors_origins=f"{app_origin}/, http://other.example", api_keys="k"))
    with srv.client() as c:
        pre = c.options(
            "/v1/query",
            headers={
                "Origin": app_origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-moondream-auth",
            },
        )
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == app_origin
        assert "x-moondream-auth" in pre.headers["access-control-allow-headers"].lower()
        r = c.post("/v1/query", json=QUERY, headers={"Origin": app_origin, "X-Moondream-Auth": "k"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == app_origin
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        # A 401 is readable by the configured page too (CORS sits outside the key check).
        r = c.post("/v1/query", json=QUERY, headers={"Origin": app_origin})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == app_origin
        r = c.post(
            "/v1/query", json=QUERY, headers={"Origin": "http://evil.example", "X-Moondream-Auth": "k"}
        )
        assert r.status_code == 403


def test_allowed_hosts_stop_dns_rebinding(start_server: Callable[..., LiveServer]) -> None:
    srv = start_server(tiny_settings(allowed_hosts="moondream.lan, 127.0.0.1"))
    with srv.client() as c:
        # A rebound name: the page's origin and the Host agree, so only the Host check catches it.
        rebound = {"Host": f"evil.example:{srv.port}", "Origin": f"http://evil.example:{srv.port}"}
        r = c.post("/v1/query", json=QUERY, headers=rebound)
        assert r.status_code == 400
        assert c.get("/health", headers={"Host": "evil.example"}).status_code == 400
        lan = {"Host": f"moondream.lan:{srv.port}", "Origin": f"http://moondream.lan:{srv.port}"}
        assert c.post("/v1/query", json=QUERY, headers=lan).status_code == 200
        assert c.post("/v1/query", json=QUERY).status_code == 200  # Host: 127.0.0.1:port
