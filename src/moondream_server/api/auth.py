"""API keys: the ``X-Moondream-Auth`` header, as the official client sends it.

No key configured → every route is open (like Moondream Station). With keys configured, every
inference route needs one of them; ``/health`` and the docs stay open. Keys are compared with
:func:`hmac.compare_digest` against every configured key, so timing reveals nothing.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from moondream_server.api.errors import ApiError

HEADER = "X-Moondream-Auth"

_scheme = APIKeyHeader(
    name=HEADER,
    auto_error=False,
    description="API key; required only when the server was started with keys.",
)


def key_matches(given: str, keys: frozenset[str]) -> bool:
    given_b = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key.encode("utf-8", "surrogateescape"))
    return ok


async def require_api_key(request: Request, key: Annotated[str | None, Depends(_scheme)]) -> None:
    keys: frozenset[str] = request.app.state.api_keys
    if not keys:
        return
    if not key or not key_matches(key.strip(), keys):
        raise ApiError(401, "Invalid or missing API key", code="invalid_api_key", param=HEADER)
