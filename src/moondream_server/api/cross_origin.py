"""Browsers: cross-origin requests are refused unless their origin is configured.

A web page on any origin can make a browser send a "simple" POST (a form or multipart upload, no
preflight) to a server on the LAN; CORS only stops the page from *reading* the answer, not the
server from doing the work. So every request whose ``Origin`` header names another origin than
the one it was sent to (its ``Host``) gets 403 before anything runs, unless that origin is in
``cors_origins``, for which Starlette's CORS middleware then answers preflights and adds the
``Access-Control-*`` headers. Same-origin pages (the playground at ``/``) and non-browser clients
(which send no ``Origin``) are unaffected.

DNS rebinding (a hostile name that resolves to this server, so its page *is* same-origin) is what
``allowed_hosts`` is for: Starlette's trusted-host check of the ``Host`` header.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from moondream_server.api.errors import render_error

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _netloc(host: str, port: int | None, scheme: str) -> tuple[str, int | None]:
    return host.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS.get(scheme)


def same_origin(origin: str, host_header: str, scheme: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) names the host and port the request was sent
    to. The scheme is not compared: behind a TLS proxy the page is https and the hop to us http."""
    try:
        o = urlsplit(origin)
        h = urlsplit(f"//{host_header}")
        o_port, h_port = o.port, h.port
    except ValueError:
        return False
    if not o.scheme or not o.hostname or not h.hostname:
        return False
    return _netloc(o.hostname, o_port, o.scheme) == _netloc(h.hostname, h_port, o.scheme)


class CrossOriginGuard:
    def __init__(self, app: ASGIApp, allowed_origins: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            raw = headers.get(b"origin")
            if raw is not None:
                origin = raw.decode("latin-1").strip()
                host = headers.get(b"host", b"").decode("latin-1")
                if not (
                    origin in (f"http://{host}", f"https://{host}")  # the common same-origin case, fast
                    or "*" in self.allowed
                    or origin in self.allowed
                    or same_origin(origin, host, scope.get("scheme", "http"))
                ):
                    shown = origin if len(origin) <= 100 else origin[:100] + "..."
                    message = (
                        f"cross-origin request from {shown} refused; "
                        "allow the origin with --cors-origins / MOONDREAM_CORS_ORIGINS"
                    )
                    response = render_error(
                        scope["path"],
                        403,
                        message,
                        code="origin_not_allowed",
                        headers={"Connection": "close"},
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def cors_middleware_options(origins: frozenset[str]) -> dict[str, object]:
    """Options of Starlette's :class:`CORSMiddleware` for the configured origins."""
    return {
        "allow_origins": sorted(origins),
        "allow_methods": ["GET", "POST"],
        "allow_headers": ["Content-Type", "Authorization", "X-Moondream-Auth"],
        "expose_headers": ["X-Request-ID", "Retry-After"],
        "max_age": 600,
    }


__all__ = ["CORSMiddleware", "CrossOriginGuard", "cors_middleware_options", "same_origin"]
