"""API keys, checked by a pure-ASGI middleware before the request body is read.

No key configured → every route is open (like Moondream Station), and whatever key a client sends
is ignored: OpenAI-style clients always send some ``Authorization: Bearer`` key, often a dummy.
With keys configured, every route needs one of them except the public ones below (health probes,
the docs and their assets, the playground page) and, when ``public_metrics`` is set,
``/metrics``. Unknown paths need a key too: the check fails closed.

A key is accepted in ``X-Moondream-Auth: <key>`` (what the official client sends) or in
``Authorization: Bearer <key>`` (what OpenAI-style clients and Prometheus scrapers send). Keys are
compared with :func:`hmac.compare_digest` against every configured key, so timing reveals nothing.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from moondream_server.api.errors import render_error

HEADER = "X-Moondream-Auth"

# Routes that never need a key: probes, docs, and static pages that run no inference.
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/health",
        "/health/ready",
        "/v1/health",
        "/v1/health/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
    }
)
PUBLIC_PREFIXES = ("/static/", "/docs/")  # the playground's and the docs' assets
METRICS_PATH = "/metrics"

_header_scheme = APIKeyHeader(
    name=HEADER, auto_error=False, description="API key; required only when the server was started with keys."
)
_bearer_scheme = HTTPBearer(
    auto_error=False, description="The same API key as a Bearer token (OpenAI-style clients, Prometheus)."
)


async def require_api_key(
    _key: Annotated[str | None, Depends(_header_scheme)],
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
) -> None:
    """Declares the two key schemes in the OpenAPI schema. The check itself is
    :class:`AuthMiddleware`: a dependency would run only after FastAPI has parsed the body."""


def key_matches(given: str, keys: frozenset[str]) -> bool:
    given_b = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key.encode("utf-8", "surrogateescape"))
    return ok


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """Every key the request carries, in either header."""
    found = []
    for name, raw in headers:
        value = raw.decode("latin-1").strip()
        if name == b"x-moondream-auth":
            found.append(value)
        elif name == b"authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                found.append(token.strip())
    return [k for k in found if k]


def is_public(path: str, *, public_metrics: bool) -> bool:
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return True
    return public_metrics and path == METRICS_PATH


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: frozenset[str], public_metrics: bool) -> None:
        self.app = app
        self.keys = keys
        self.public_metrics = public_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or is_public(scope["path"], public_metrics=self.public_metrics)
        ):
            await self.app(scope, receive, send)
            return
        if any(key_matches(k, self.keys) for k in presented_keys(scope["headers"])):
            await self.app(scope, receive, send)
            return
        # The body was never read: close the connection rather than parse what follows as a request.
        headers = {"WWW-Authenticate": "Bearer", "Connection": "close"}
        response = render_error(
            scope["path"],
            401,
            "Invalid or missing API key",
            code="invalid_api_key",
            param=HEADER,
            headers=headers,
        )
        await response(scope, receive, send)
