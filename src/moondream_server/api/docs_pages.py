"""The documentation pages (/docs: Swagger UI, /redoc: ReDoc) work offline and contact no one.

Their scripts and styles are the files the ``fastapi-offline`` package ships, served under
:data:`DOCS_ASSETS` (see ``app.py``), instead of FastAPI's default CDN links. ReDoc's bundle still
links its vendor's logo from cdn.redoc.ly; the Content-Security-Policy these pages carry keeps
the browser to this server, so that image is simply not shown.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCS_ASSETS = "/docs/assets"
DOCS_PAGES = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
# Both pages start their viewer with an inline script; ReDoc renders in a blob: web worker.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class DocsPolicyMiddleware:
    """Adds :data:`DOCS_CSP` to the answers of the documentation pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in DOCS_PAGES:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("Content-Security-Policy", DOCS_CSP)
            await send(message)

        await self.app(scope, receive, send_with_policy)
